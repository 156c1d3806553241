# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: python3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Mixtures
#
# > Domain balance, frequency-aware up-sampling and phase mixtures that anneal toward high-quality data.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/05_data_mixture.ipynb)

# %%
#| default_exp data.mixture

# %%
#| hide
# Colab only: JAX for this runtime's accelerator, xgen_small, and what this notebook imports besides. The runtime's
# own JAX is asked which accelerator it sees (in a subprocess, so nothing is imported here yet); device files decide
# when it cannot say (/dev/accel* or /dev/vfio for TPUs, nvidia-smi for GPUs).
import glob, os, shutil, subprocess, sys
if 'google.colab' in sys.modules:
    probe = subprocess.run([sys.executable, '-c', 'import jax; print(jax.default_backend())'], capture_output=True, text=True)
    backend = (probe.stdout.split() or [''])[-1] if probe.returncode == 0 else ''
    if backend not in ('tpu', 'gpu', 'cpu'):
        backend = 'tpu' if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*') else 'gpu' if shutil.which('nvidia-smi') else 'cpu'
    jax_extra = {'gpu': 'cuda12'}.get(backend, backend)
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', f'jax[{jax_extra}]==0.10.2', 'fastcore==1.12.47',
                    'xgen_small @ git+https://github.com/xgen-small/xgen_small'], check=True)

# %%
#| export
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xgen_small.config import Config

# %%
from fastcore.test import test_eq, test_close, test_fail
import zlib
from collections import Counter


# %% [markdown]
# The report balances "general data with specialised content for code, mathematics, and natural
# language", calls its curation "domain-balanced, frequency-aware" with "targeted up-sampling", and
# describes "quality annealing": later pre-training phases shift the mixture toward the
# classifier-filtered high-quality subsets. The formulas are not published; this notebook states ours.
#
# A **mixture plan** says, for each pre-training phase, how many times each document is expected to
# be seen (its *epochs* in that phase, a real number). It is computed in three steps:
#
# 1. **Domain balance.** Each phase has a token budget and a target share per domain; domain $d$ gets
#    $B_d = \text{share}_d \cdot B$ tokens, however many tokens the corpus happens to hold for it.
# 2. **Within a domain, a weight per document**:
#    $w_i = q_i^{\alpha} \cdot \min(f_i^{\tau}, c)$, where $q_i \in [0, 1]$ is the quality score
#    (notebook 03), $f_i \ge 1$ the size of the document's duplicate cluster (notebook 04), $\tau$ a
#    temperature ($\tau = 0$: ignore popularity, $\tau = 1$: proportional to copies) and $c$ a cap,
#    so a document copied ten thousand times by a mirror network cannot take over. $\alpha$ is the
#    phase's **quality sharpening**: $\alpha = 0$ treats all kept documents alike, larger $\alpha$
#    concentrates the budget on the best ones. Documents below the phase's `min_quality` get no weight.
# 3. **Epochs.** Document $i$ is seen $e_i = s_d w_i$ times, with the scale $s_d$ chosen so that
#    the domain's tokens add up to $B_d$: $\sum_i e_i n_i = B_d$ ($n_i$ its length in tokens). No
#    document may exceed `max_epochs` (repeating data too often hurts, Muennighoff et al., 2023); what a
#    capped document cannot absorb is spread over the others. If a domain cannot fill its budget even
#    with every document at the cap, the plan says so instead of pretending.

# %%
#| export
@dataclass(frozen=True)
class Phase(Config):
    "One pre-training phase of the mixture: a token budget, domain shares and quality sharpening."
    name: str
    tokens: float
    domain_shares: dict
    quality_power: float = 0.0
    min_quality: float = 0.0

    def __post_init__(self):
        if self.tokens <= 0: raise ValueError(f"phase {self.name!r}: tokens must be positive")
        total = sum(self.domain_shares.values())
        if any(v < 0 for v in self.domain_shares.values()) or abs(total - 1) > 1e-6:
            raise ValueError(
                f"phase {self.name!r}: domain_shares must be non-negative and sum to 1, got {self.domain_shares} (sum "
                f"{total:.3f})"
            )

@dataclass(frozen=True)
class MixtureConfig(Config):
    "Phases plus the frequency-aware up-sampling and repetition limits shared by all phases."
    phases: tuple[Phase, ...]
    freq_temperature: float = 0.5
    freq_cap: float = 4.0
    max_epochs: float = 4.0

    def __post_init__(self):
        if not self.phases: raise ValueError("a mixture needs at least one phase")
        if len({p.name for p in self.phases}) != len(self.phases): raise ValueError("phase names must be unique")
        if self.freq_cap < 1 or self.max_epochs <= 0 or self.freq_temperature < 0:
            raise ValueError("need freq_cap >= 1, max_epochs > 0 and freq_temperature >= 0")

def doc_weights(quality: np.ndarray, frequency: np.ndarray, phase: Phase, cfg: MixtureConfig) -> np.ndarray:
    "Unnormalised sampling weight of each document in `phase`: q^alpha * min(f^tau, cap), zero below min_quality."
    q = np.clip(np.asarray(quality, np.float64), 0, 1)
    f = np.maximum(np.asarray(frequency, np.float64), 1)
    w = q ** phase.quality_power * np.minimum(f ** cfg.freq_temperature, cfg.freq_cap)
    return np.where(q >= phase.min_quality, w, 0.0)

def fill_epochs(weights: np.ndarray, n_tokens: np.ndarray, budget: float, max_epochs: float) -> np.ndarray:
    "Epochs e = s * w with sum(e * n) = budget and e <= max_epochs (water-filling); short if the cap binds everywhere."
    w, n = np.asarray(weights, np.float64), np.asarray(n_tokens, np.float64)
    e = np.zeros_like(w)
    free = w > 0
    remaining = budget
    while free.any() and remaining > 1e-9:
        s = remaining / np.sum(w[free] * n[free])
        trial = s * w
        over = free & (trial > max_epochs)
        if not over.any():
            e[free] = trial[free]; break
        e[over] = max_epochs
        remaining -= np.sum(max_epochs * n[over])
        free &= ~over
    return e


# %%
w = np.array([1.0, 1.0, 4.0]); n = np.array([100, 100, 100])
fill_epochs(w, n, 600, max_epochs=10), fill_epochs(w, n, 600, max_epochs=2.5)

# %%
test_close(fill_epochs(w, n, 600, 10), [1, 1, 4], eps=1e-9)
test_close(fill_epochs(w, n, 600, 2.5), [1.75, 1.75, 2.5], eps=1e-9)   # the capped document's excess is spread
test_close(fill_epochs(w, n, 10_000, 2.5), [2.5, 2.5, 2.5], eps=1e-9)   # budget cannot be met: everything at the cap


# %% [markdown]
# ## The plan
#
# `plan_mixture` takes per-document arrays (domain, quality, frequency, token count) and returns the
# epochs of every document in every phase, plus a table of what each phase actually delivers per
# domain, so a shortfall is visible.

# %%
#| export
@dataclass
class MixturePlan:
    "Epochs per document and phase (`epochs[phase]` aligned with the input arrays), and delivered tokens."
    phases: list
    epochs: dict
    delivered: dict        # phase -> domain -> tokens
    shortfall: dict        # phase -> domain -> tokens that the corpus could not supply under max_epochs

    def shares(self, phase: str) -> dict:
        tot = sum(self.delivered[phase].values())
        return {d: t / tot for d, t in self.delivered[phase].items()} if tot else {}

def plan_mixture(domains, quality, frequency, n_tokens, cfg: MixtureConfig) -> MixturePlan:
    "Epochs of every document in every phase of `cfg` (arrays are aligned, one entry per document)."
    domains = np.asarray(domains); n = np.asarray(n_tokens, np.float64)
    epochs, delivered, shortfall = {}, {}, {}
    for ph in cfg.phases:
        unknown = set(ph.domain_shares) - set(domains.tolist())
        e = np.zeros(len(domains))
        delivered[ph.name], shortfall[ph.name] = {}, {}
        for d, share in ph.domain_shares.items():
            mask = domains == d
            budget = share * ph.tokens
            if budget == 0: continue
            if d in unknown or not mask.any(): shortfall[ph.name][d] = budget; delivered[ph.name][d] = 0.0; continue
            e[mask] = fill_epochs(
                doc_weights(np.asarray(quality)[mask], np.asarray(frequency)[mask], ph, cfg),
                n[mask],
                budget,
                cfg.max_epochs,
            )
            delivered[ph.name][d] = float(np.sum(e[mask] * n[mask]))
            if budget - delivered[ph.name][d] > 1e-6 * budget: shortfall[ph.name][d] = budget - delivered[ph.name][d]
        epochs[ph.name] = e
    return MixturePlan([p.name for p in cfg.phases], epochs, delivered, shortfall)


# %% [markdown]
# ## Our default: two phases with quality annealing
#
# Phase 1 (`broad`, 80% of tokens) balances the four domains and treats every kept document alike
# ($\alpha = 0$). Phase 2 (`anneal`, the last 20%, when the learning rate decays; notebook 09 ties the
# two together) shifts share toward prose, math and code and sharpens on quality ($\alpha = 3$,
# documents scoring below 0.5 excluded). Shares and powers are our choices, not the report's.

# %%
#| export
def default_mixture(total_tokens: float, anneal_fraction: float = 0.2) -> MixtureConfig:
    "Our two-phase default (see the notebook for the reasoning); `total_tokens` across both phases."
    return MixtureConfig(phases=(
        Phase('broad', total_tokens * (1 - anneal_fraction), {'web': 0.45, 'prose': 0.2, 'code': 0.2, 'math': 0.15}),
        Phase('anneal', total_tokens * anneal_fraction, {'web': 0.2, 'prose': 0.3, 'code': 0.25, 'math': 0.25},
              quality_power=3.0, min_quality=0.5)))


# %% [markdown]
# On a synthetic corpus first, where the effect of each knob is easy to see: 1,000 documents per
# domain, qualities spread over [0, 1], a few heavily duplicated documents.

# %%
rng = np.random.default_rng(0)
N = 4000
dom = np.repeat(['web', 'prose', 'code', 'math'], N // 4)
q = rng.beta(4, 2, N)
f = np.where(rng.random(N) < 0.05, rng.integers(2, 200, N), 1)
ntok = rng.integers(200, 2000, N)
cfg = default_mixture(total_tokens=float(ntok.sum()) * 0.5)
plan = plan_mixture(dom, q, f, ntok, cfg)
top = q >= np.quantile(q, 0.75)
print(f"{'phase':8}" + ''.join(f'{d:>8}' for d in ('web', 'prose', 'code', 'math')) + f"{'top-quartile':>14}{'max epochs':>12}")
for ph in plan.phases:
    e = plan.epochs[ph]; sh = plan.shares(ph)
    print(f'{ph:8}' + ''.join(f'{sh[d]:>8.1%}' for d in ('web', 'prose', 'code', 'math'))
          + f'{np.sum(e[top] * ntok[top]) / np.sum(e * ntok):>14.1%}{e.max():>12.2f}')

# %%
for ph in cfg.phases:
    for d, share in ph.domain_shares.items(): test_close(plan.shares(ph.name)[d], share, eps=1e-6)
    test_eq(plan.epochs[ph.name].max() <= cfg.max_epochs + 1e-9, True)
broad, anneal = plan.epochs['broad'], plan.epochs['anneal']
share_top = lambda e: np.sum(e[top] * ntok[top]) / np.sum(e * ntok)
test_eq(share_top(anneal) > share_top(broad) + 0.2, True)                      # annealing sharpens on quality
test_eq(bool(np.all(anneal[q < 0.5] == 0)), True)
# frequency-aware: within a domain and phase 1 (alpha=0), a 100-copy document gets min(100^0.5, 4) = 4x the epochs
i1 = np.flatnonzero((dom == 'web') & (f == 1))[0]; i100 = np.flatnonzero((dom == 'web') & (f >= 16))[0]
test_close(broad[i100] / broad[i1], min(cfg.freq_cap, f[i100] ** cfg.freq_temperature), eps=1e-6)

# %% [markdown]
# The knobs, one at a time: the temperature $\tau$ decides how much popularity counts, the cap stops
# it from running away; $\alpha$ decides how hard a phase leans on quality.

# %%
import matplotlib.pyplot as plt
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
fr = np.logspace(0, 4, 100)
for tau in (0.0, 0.25, 0.5, 1.0):
    axes[0].plot(fr, np.minimum(fr ** tau, 4.0), label=f'tau={tau}')
axes[0].set_xscale('log'); axes[0].set_xlabel('duplicate cluster size f'); axes[0].set_ylabel('up-sampling factor')
axes[0].set_title('frequency-aware weight, cap 4'); axes[0].legend()
qs = np.linspace(0, 1, 100)
for a in (0, 1, 3, 6):
    axes[1].plot(qs, qs ** a / np.mean(qs ** a), label=f'alpha={a}')
axes[1].set_xlabel('quality score q'); axes[1].set_ylabel('relative weight'); axes[1].set_title('quality sharpening'); axes[1].legend()
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Bad configurations are refused

# %%
test_fail(lambda: Phase('p', 100, {'web': 0.7, 'code': 0.2}), contains='sum to 1')
test_fail(lambda: Phase('p', 0, {'web': 1.0}), contains='tokens must be positive')
test_fail(lambda: MixtureConfig(phases=()), contains='at least one phase')
test_fail(lambda: MixtureConfig(phases=(Phase('a', 1, {'web': 1.}), Phase('a', 1, {'web': 1.}))), contains='unique')
short = plan_mixture(np.array(['web', 'web']), [1., 1.], [1, 1], [10, 10], MixtureConfig((Phase('p', 1000, {'web': 0.5, 'math': 0.5}),)))
short.shortfall

# %%
test_close(short.shortfall['p']['web'], 500 - 80, eps=1e-6)   # 2 docs x 10 tokens x 4 epochs = 80 < 500
test_eq(short.shortfall['p']['math'], 500)                      # no math at all

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
