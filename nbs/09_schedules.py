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
# # Learning-rate schedules
#
# > Multi-phase learning-rate schedules (warmup, stable, cosine, linear, WSD), each tied to a mixture phase.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/09_schedules.ipynb)

# %%
#| default_exp schedules

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

import optax

from xgen_small.config import Config


# %%
import numpy as np

# %%
from fastcore.test import test_eq, test_close, test_fail
from xgen_small.data.mixture import default_mixture

# %% [markdown]
# The report pre-trains with "a multi-phase learning rate schedule" and shifts the data mixture toward
# high-quality subsets in later phases ("quality annealing"). The two belong together: the end of
# training, when the learning rate decays and the model settles, is when the data has the most lasting
# effect, so that is when the best data should be shown (the recipe of MiniCPM, Llama 3 and OLMo 2's
# annealing phases). A schedule here is a list of phases, each with its own shape, each named after
# the mixture phase (notebook 05) it trains on, so that the train loop can switch the data loader at
# the same step as the schedule switches shape.
#
# Shapes of one phase, all starting with an optional linear **warmup** from wherever the previous phase
# ended (zero at the very start; a *re-warmup* between phases):
#
# - `constant`: hold the peak (the "stable" part of warmup-stable-decay);
# - `cosine`: cosine decay from the peak to `final_lr` (Loshchilov & Hutter, 2016);
# - `linear`: linear decay to `final_lr`;
# - `wsd`: stable at the peak, then a linear decay over the last `decay_fraction` of the phase
#   (warmup-stable-decay, Hu et al., 2024, arXiv 2404.06395), which lets a run be extended or branched
#   before the decay.

# %%
#| export
DECAYS = ('constant', 'cosine', 'linear', 'wsd')

@dataclass(frozen=True)
class LRPhase(Config):
    "One phase of the learning-rate schedule, named after the data-mixture phase it trains on."
    name: str
    steps: int
    peak_lr: float
    warmup_steps: int = 0
    decay: str = 'constant'
    final_lr: float = 0.0
    decay_fraction: float = 0.2

    def __post_init__(self):
        if self.steps <= 0: raise ValueError(f"phase {self.name!r}: steps must be positive, got {self.steps}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"phase {self.name!r}: warmup_steps must be in [0, steps]")
        if self.decay not in DECAYS:
            raise ValueError(f"phase {self.name!r}: decay must be one of {DECAYS}, got {self.decay!r}")
        if self.peak_lr <= 0 or self.final_lr < 0:
            raise ValueError(f"phase {self.name!r}: need peak_lr > 0 and final_lr >= 0")
        if not 0 < self.decay_fraction <= 1: raise ValueError(f"phase {self.name!r}: decay_fraction must be in (0, 1]")

def _phase_schedule(p: LRPhase, start_lr: float) -> optax.Schedule:
    rest = p.steps - p.warmup_steps
    parts, bounds = [], []
    if p.warmup_steps:
        parts.append(optax.linear_schedule(start_lr, p.peak_lr, p.warmup_steps))
        bounds.append(p.warmup_steps)
    if p.decay == 'constant' or rest == 0: parts.append(optax.constant_schedule(p.peak_lr))
    elif p.decay == 'cosine': parts.append(optax.cosine_decay_schedule(p.peak_lr, rest, alpha=p.final_lr / p.peak_lr))
    elif p.decay == 'linear': parts.append(optax.linear_schedule(p.peak_lr, p.final_lr, rest))
    else:
        n_decay = max(1, round(rest * p.decay_fraction))
        parts.append(optax.constant_schedule(p.peak_lr)); bounds.append(p.warmup_steps + rest - n_decay)
        parts.append(optax.linear_schedule(p.peak_lr, p.final_lr, n_decay))
    return optax.join_schedules(parts, bounds) if bounds else parts[0]

def end_lr(p: LRPhase) -> float:
    "The learning rate a phase ends at."
    return p.peak_lr if p.decay == 'constant' else p.final_lr

def multi_phase_schedule(phases) -> optax.Schedule:
    "One optax schedule over all `phases`; each starts where the previous ended (re-warmup if it has warmup steps)."
    if not phases: raise ValueError("a schedule needs at least one phase")
    scheds, bounds, start, t = [], [], 0.0, 0
    for p in phases:
        scheds.append(_phase_schedule(p, start)); t += p.steps; bounds.append(t); start = end_lr(p)
    return optax.join_schedules(scheds, bounds[:-1])

def phase_at(phases, step: int) -> str:
    "The name of the phase that `step` (0-based) belongs to; the last phase for steps past the end."
    t = 0
    for p in phases:
        t += p.steps
        if step < t: return p.name
    return phases[-1].name

def total_steps(phases) -> int: return sum(p.steps for p in phases)

# %% [markdown]
# ## The default: warmup-stable on the broad mixture, decay on the annealing mixture
#
# Matching the two-phase mixture of notebook 05: 80% of the steps on the `broad` mixture with a short
# warmup and a constant learning rate, then the last 20% on the `anneal` mixture with a short re-warmup
# (the annealing data are new to the model) and a linear decay to 1% of the peak.

# %%
#| export
def default_schedule(
    steps: int, peak_lr: float = 3e-3, anneal_fraction: float = 0.2, warmup_fraction: float = 0.02
) -> tuple:
    "Two phases: 'broad' (warmup, stable) then 'anneal' (short re-warmup, linear decay to 1% of the peak)."
    n_anneal = max(1, round(steps * anneal_fraction)); n_broad = steps - n_anneal
    return (
        LRPhase('broad', n_broad, peak_lr, warmup_steps=max(1, round(steps * warmup_fraction)), decay='constant'),
        LRPhase(
            'anneal',
            n_anneal,
            peak_lr,
            warmup_steps=max(1, round(n_anneal * 0.05)),
            decay='linear',
            final_lr=peak_lr / 100,
        ),
    )

# %%
phases = default_schedule(1000)
sched = multi_phase_schedule(phases)
print(phases)
print({s: float(sched(s)) for s in (0, 10, 20, 500, 799, 800, 805, 810, 900, 999)})

# %%
test_close(float(sched(0)), 0.0, eps=1e-9)
test_close(float(sched(20)), 3e-3, eps=1e-9)
test_close(float(sched(500)), 3e-3, eps=1e-9)
test_close(float(sched(999)), 3e-5, eps=2e-5)
test_eq([phase_at(phases, s) for s in (0, 799, 800, 999, 5000)], ['broad', 'broad', 'anneal', 'anneal', 'anneal'])

# %% [markdown]
# Every shape, and the mixture each phase trains on:

# %%
import matplotlib.pyplot as plt
steps = np.arange(1000)
shapes = {
    'default (constant -> re-warmup + linear)': phases,
    'cosine, one phase': (LRPhase('broad', 1000, 3e-3, warmup_steps=50, decay='cosine', final_lr=3e-4),),
    'WSD + cosine anneal': (LRPhase('broad', 700, 3e-3, warmup_steps=30, decay='wsd', final_lr=1e-3, decay_fraction=0.3),
                            LRPhase('anneal', 300, 1.5e-3, warmup_steps=30, decay='cosine', final_lr=1e-5)),
}
fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.2), gridspec_kw=dict(width_ratios=[2, 1]))
for label, ph in shapes.items(): ax.plot(steps, [float(multi_phase_schedule(ph)(s)) for s in steps], label=label)
ax.axvline(800, ls=':', c='grey'); ax.set_xlabel('step'); ax.set_ylabel('learning rate'); ax.legend(fontsize=8); ax.set_title('schedules')
mix = default_mixture(1.0)
left = np.zeros(len(mix.phases))
for d, c in zip(('web', 'prose', 'code', 'math'), ('tab:blue', 'tab:green', 'tab:orange', 'tab:red')):
    vals = np.array([p.domain_shares[d] for p in mix.phases])
    bx.barh([p.name for p in mix.phases], vals, left=left, color=c, label=d); left += vals
bx.set_title('data mixture per phase'); bx.legend(ncol=2, fontsize=8); bx.invert_yaxis()
plt.tight_layout(); plt.show()

# %%
wsd = multi_phase_schedule(shapes['WSD + cosine anneal'])
test_close(float(wsd(450)), 3e-3, eps=1e-9)                      # still stable (decay starts at step 499)
test_close(float(wsd(699)), 1e-3, eps=2e-5)                      # decayed by the end of its phase
test_close(float(wsd(730)), 1.5e-3, eps=1e-9)                    # re-warmed up to the anneal peak
test_eq(total_steps(phases), 1000)
test_eq([p.name for p in default_mixture(1.0).phases], [p.name for p in phases])   # schedule and mixture phases line up
test_fail(lambda: LRPhase('x', 10, 1e-3, decay='exp'), contains='decay must be one of')
test_fail(lambda: LRPhase('x', 10, 1e-3, warmup_steps=20), contains='warmup_steps')
test_fail(lambda: multi_phase_schedule(()), contains='at least one phase')

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
