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
# # Long context: two-stage extension and over-length training
#
# > Why the RoPE base grows, two-stage length extension with over-length training, and its recipe.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/20_long_context.ipynb)

# %%
#| default_exp extend

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

# %% [markdown]
# xGen-small is pre-trained at a short context and then *extended*: "two-stage extension (32K then 128K),
# over-length training to 256K, and sequence parallelism to manage memory constraints". Three ideas are packed in
# that sentence, and this notebook builds each:
#
# 1. **Change the position encoding for the new length.** A model trained at length $L$ has only ever seen
#    relative distances below $L$; RoPE at larger distances produces rotation angles it has never seen. Raising
#    the RoPE base stretches the wavelengths so that the new length looks like the old one to every slow
#    dimension, and *every* one matters: the rule that holds only the slowest leaves a wall well short of the
#    target, which the end of this notebook measures.
# 2. **Train in stages on long documents.** Each stage trains at its length on a mixture where long-range
#    dependencies actually occur: long natural documents, related documents concatenated, and synthetic
#    retrieval documents whose answer sits thousands of tokens before the question.
# 3. **Train beyond the target.** The last stage trains at twice the final length (256K for a 128K model), so
#    that every position up to the advertised context is well inside the trained range rather than at its edge.
#
# Attention at these lengths is quadratic in time but need not be in memory: the stages run on the
# memory-linear blockwise path (notebook 11) and, when the mesh has a `sequence` axis, the ring sequence-parallel
# attention of notebook 14, which splits each sequence across devices.

# %%
#| export
from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import jax
import numpy as np

from xgen_small import ruler
from xgen_small.config import Config, ConfigError, ModelConfig
from xgen_small.data.loader import TokenStore, build_token_store
from xgen_small.generate import generate
from xgen_small.layers import rope_frequencies
from xgen_small.model import Decoder, model_with_params
from xgen_small.schedules import LRPhase
from xgen_small.sharding import MeshConfig
from xgen_small.tokenizer import Tokenizer
from xgen_small.train import TrainConfig, train


# %%
from flax import nnx

# %% [markdown]
# ## Why the RoPE base must grow
#
# RoPE rotates each pair $i$ of query/key dimensions by the angle $m\,\omega_i$ at position $m$, with
# $\omega_i = \theta^{-2i/d}$: fast pairs (small $i$) turn many times within a few tokens, slow pairs (large $i$)
# have wavelengths $2\pi/\omega_i$ far longer than the context. The attention score between positions $m$ and $n$
# depends on $(m-n)\,\omega_i$ only. Two consequences, plotted below:
#
# * **Left: wavelengths against the context.** Pairs whose wavelength is shorter than the training length have
#   seen every angle during pre-training; pairs whose wavelength is longer have seen only the arc
#   $[0, L\,\omega_i)$. At distances beyond $L$ those slow pairs produce angles never seen in training, which is
#   why a model's retrieval collapses past its training length. A larger base shifts the whole curve up, so that
#   at the new length $L'$ the slow pairs again sweep no more than the arc they swept at $L$.
# * **Right: the long-range decay.** Su et al. (RoFormer, 2021, §3.4.3) bound $|q \cdot k|$ by a quantity that
#   decays with distance; with base 10,000 and head size 128 the bound has reached its floor well before 32K
#   tokens, so distant tokens cannot be told apart from noise by position. Larger bases decay later: the curves
#   for 500K (Llama 3's choice) and 8M reach the 128K range still above the floor.
#
# Which base for which length? The paper does not publish its bases, so the rule is ours, and every stage can
# override it. Two rules, for a length ratio $s = L'/L$:
#
# * **NTK-aware** (bloc97, 2023; analysed by Peng et al., YaRN, arXiv 2309.00071): $\theta' = \theta\, s^{d/(d-2)}$
#   keeps the angle swept by the *slowest* pair at $L'$ equal to what it was at $L$. The other slow pairs are not
#   held: pair $i$ reaches angles it never saw once the distance passes $L\,(\theta'/\theta)^{2i/d}$, which for the
#   faster of them is far short of $L'$.
# * **Critical pair** (our default): let $i_c$ be the first pair whose wavelength exceeds $L$, the "critical
#   dimension" of Liu et al. (Scaling Laws of RoPE-based Extrapolation, arXiv 2310.05209). Every pair from $i_c$ on
#   swept only part of a turn in pre-training. Holding *all* of them to that arc at $L'$ needs
#   $L'\,\theta'^{-2i/d} \le L\,\theta^{-2i/d}$ for every $i \ge i_c$, that is $\theta' = \theta\, s^{d/(2 i_c)}$
#   (NTK is the same formula with $i_c = d/2 - 1$). Pairs faster than $i_c$ completed whole turns in pre-training,
#   so no angle is new to them.
#
# On the tiny model ($d = 32$, $L = 512$, $\theta = 10{,}000$) $i_c = 8$, so the critical rule gives $\theta s^2$:
# 40,000 at 1K and 160,000 at 2K, where NTK gives 20,946 and 43,873. The end of this notebook measures the
# difference: under NTK bases retrieval stops at about 1,500 tokens of distance, right where pair 8 leaves its
# pre-trained arc; under critical-pair bases it holds at every distance up to 4K.

# %%
#| export
def critical_pair(theta: float, head_dim: int, base_len: int) -> int:
    "The first rotation pair whose wavelength exceeds `base_len`: it and every slower pair saw only part of a turn."
    slow = np.nonzero(2 * np.pi / rope_frequencies(head_dim, theta) > base_len)[0]
    return int(slow[0]) if len(slow) else head_dim // 2

def rope_base_for(theta: float, head_dim: int, base_len: int, target_len: int, rule: str = 'critical') -> float:
    """The RoPE base for extending a model trained at `base_len` with base `theta` to `target_len`.
    `rule='critical'` keeps every pair that did not complete a turn in pre-training within the arc it swept there;
    `rule='ntk'` keeps only the slowest pair there (the NTK-aware base)."""
    if target_len < base_len: raise ValueError(f"target_len {target_len} is shorter than base_len {base_len}")
    if rule not in ('critical', 'ntk'):
        raise ValueError(f"unknown RoPE base rule {rule!r}; expected 'critical' or 'ntk'")
    ic = head_dim // 2 - 1 if rule == 'ntk' else critical_pair(theta, head_dim, base_len)
    if ic >= head_dim // 2: return float(theta)           # every pair turned fully in pre-training: no angle is new
    if ic == 0:
        raise ValueError(f"base_len {base_len} is shorter than the fastest RoPE wavelength (2 pi): no base can hold it")
    return float(theta * (target_len / base_len) ** (head_dim / (2 * ic)))

def unseen_angle_distance(theta: float, new_theta: float, head_dim: int, base_len: int) -> float:
    """The shortest distance at which some pair, under base `new_theta`, reaches an angle it never reached in
    pre-training (`base_len` tokens at base `theta`); infinite if none does."""
    w0, w1 = rope_frequencies(head_dim, theta), rope_frequencies(head_dim, new_theta)
    partial = 2 * np.pi / w0 > base_len                  # the pairs that swept only part of a turn
    return float(np.min(base_len * w0[partial] / w1[partial])) if partial.any() else float('inf')

def rope_decay_bound(freqs: np.ndarray, distances: np.ndarray) -> np.ndarray:
    "RoFormer's relative upper bound of |q.k| at each distance: the mean over j of |sum_{i<=j} exp(1j * m * w_i)|."
    partial = np.cumsum(np.exp(1j * np.outer(distances, freqs)), axis=1)
    return np.abs(partial).mean(axis=1)

# %%
import matplotlib.pyplot as plt
theta0, d_tiny = 10_000.0, 32
ntk, crit = (rope_base_for(theta0, d_tiny, 512, 2048, rule) for rule in ('ntk', 'critical'))
fig, ax = plt.subplots(1, 2, figsize=(11.5, 3.8))
for th, label in [(theta0, 'base 10,000 (pre-training at 512)'), (ntk, f'NTK base {ntk:,.0f} (2K)'), (crit, f'critical-pair base {crit:,.0f} (2K)')]:
    ax[0].semilogy(2 * np.pi / rope_frequencies(d_tiny, th), 'o-', ms=3, label=label)
for L, ls in [(512, '--'), (2048, ':')]:
    ax[0].axhline(L, color='k', ls=ls, lw=0.8); ax[0].text(0.2, L * 1.2, f'{L} tokens', fontsize=8)
ic = critical_pair(theta0, d_tiny, 512)
ax[0].axvline(ic, color='grey', lw=0.8); ax[0].text(ic + 0.2, 1e5, f'critical pair {ic}', fontsize=8)
ax[0].set(xlabel='pair index i (tiny model, head_dim 32)', ylabel='wavelength 2π/ω_i (tokens)', title='RoPE wavelengths vs. context length')
ax[0].legend(fontsize=8, loc='lower right')
dist = np.unique(np.geomspace(1, 262_144, 2500).astype(int))
for th in (1e4, 5e5, 8e6):
    b = rope_decay_bound(rope_frequencies(128, th), dist)
    k = 15; ax[1].semilogx(dist[k - 1:], np.convolve(b, np.ones(k) / k, mode='valid'), label=f'base {th:,.0f}')
for L in (8192, 32768, 131072): ax[1].axvline(L, color='k', ls=':', lw=0.8)
ax[1].set(xlabel='relative distance (tokens); dotted: 8K, 32K, 128K', ylabel='bound on |q·k| (smoothed)',
          title='long-range decay, head_dim 128'); ax[1].legend(fontsize=8)
fig.tight_layout(); plt.show()

# %% [markdown]
# Left: under the NTK base the pairs just above the critical one stay below the 2K line, so their angles at 2K
# distances are new; the critical-pair base lifts every one of them above it. The distance at which some pair
# first reaches an angle it never saw in pre-training (`unseen_angle_distance`) says the same in one number per
# base. For the full-scale shape (head size 128, base 500,000 at 8K) the critical pair is 35 of 64:

# %%
slow = lambda th, d: rope_frequencies(d, th)[-1]
for name, (th0, d, L0, lens) in {'tiny': (theta0, d_tiny, 512, (1024, 2048, 4096)),
                                 'xgen': (500_000.0, 128, 8192, (32_768, 131_072, 262_144))}.items():
    print(f'{name}: head_dim {d}, pre-trained at {L0:,} with base {th0:,.0f}, critical pair {critical_pair(th0, d, L0)} of {d // 2}')
    for L in lens:
        cells = []
        for rule in ('ntk', 'critical'):
            th = rope_base_for(th0, d, L0, L, rule)
            cells.append(f'{rule:>8} base {th:>14,.0f}: new angles from {unseen_angle_distance(th0, th, d, L0):>9,.0f} tokens')
        print(f'  {L:>7,} tokens | ' + ' | '.join(cells))

# %%
from fastcore.test import test_eq, test_close, test_fail
test_close(rope_base_for(1e4, 32, 512, 512), 1e4)
# NTK holds the slowest pair's arc; the critical rule holds every partially turned pair's, so new angles start at L'
for L in (1024, 4096, 131072): test_close(L * slow(rope_base_for(1e4, 32, 512, L, 'ntk'), 32), 512 * slow(1e4, 32), eps=1e-6)
test_close(rope_base_for(5e5, 128, 8192, 32768, 'ntk'), 5e5 * 4 ** (128 / 126))
test_eq(critical_pair(1e4, 32, 512), 8)                          # wavelengths 2*pi*10000**(i/16): 353 at i=7, 628 at i=8
test_close(rope_base_for(1e4, 32, 512, 2048), 1e4 * 4 ** 2)
for th0, d, L0, L in ((1e4, 32, 512, 2048), (1e4, 32, 512, 4096), (5e5, 128, 8192, 131_072)):
    test_close(unseen_angle_distance(th0, rope_base_for(th0, d, L0, L), d, L0), L, eps=1e-6 * L)
    assert unseen_angle_distance(th0, rope_base_for(th0, d, L0, L, 'ntk'), d, L0) < 0.6 * L
test_eq(rope_base_for(10.0, 8, 512, 2048), 10.0)                 # every wavelength under 512: nothing to stretch
test_fail(lambda: rope_base_for(1e4, 32, 4, 16), contains='fastest RoPE wavelength')
test_fail(lambda: rope_base_for(1e4, 32, 1024, 512), contains='shorter')
test_fail(lambda: rope_base_for(1e4, 32, 512, 1024, 'yarn'), contains='unknown RoPE base rule')
b = rope_decay_bound(rope_frequencies(128, 1e4), np.array([0, 100_000]))
test_close(b[0], (1 + 64) / 2)                  # distance 0: every partial sum is j terms of 1, mean over j = 1..64
assert b[1] < b[0] / 3                           # and it has decayed far by 100K tokens

# %% [markdown]
# ## The stage recipe
#
# A stage is a length, a RoPE base, a learning-rate schedule, a batch, a mixture and a mesh. The recipe checks
# the shape the paper describes: lengths strictly increasing from the pre-training length, and, when the last
# stage is over-length, that it trains at twice the target and keeps the target stage's RoPE base (the model is
# then evaluated at the target, with the base it was trained for).
#
# Full-scale values are ours where the paper is silent: an 8K pre-training context with base 500,000 (as our
# `xgen_4b` / `xgen_9b` presets), critical-pair bases for 32K and 128K (about 6.3M and 80M), about 4M tokens per step, and
# sequence-parallel degrees that keep one sequence's activations per chip bounded as the length grows.

# %%
#| export
MIXTURE_PARTS = ('long_natural', 'concatenated', 'retrieval')

@dataclass(frozen=True)
class ExtensionStage(Config):
    "One length-extension stage."
    name: str
    seq_len: int
    rope_theta: float
    steps: int
    batch_size: int
    peak_lr: float
    warmup_steps: int = 10
    final_lr: float = 0.0
    sequence: int = 1                    # sequence-parallel degree (mesh axis 'sequence')
    mixture: tuple = (('long_natural', 0.3), ('concatenated', 0.3), ('retrieval', 0.4))
    overlength: bool = False

    def __post_init__(self):
        for n in ('seq_len', 'steps', 'batch_size', 'sequence'):
            if getattr(self, n) < 1: raise ConfigError(f"stage {self.name!r}: {n} must be positive")
        if self.rope_theta <= 0 or self.peak_lr <= 0:
            raise ConfigError(f"stage {self.name!r}: rope_theta and peak_lr must be positive")
        if self.seq_len % self.sequence:
            raise ConfigError(f"stage {self.name!r}: seq_len {self.seq_len} must divide by sequence {self.sequence}")
        parts = dict(self.mixture)
        if set(parts) - set(MIXTURE_PARTS):
            raise ConfigError(f"stage {self.name!r}: unknown mixture parts {sorted(set(parts) - set(MIXTURE_PARTS))}")
        if abs(sum(parts.values()) - 1) > 1e-6 or min(parts.values()) < 0:
            raise ConfigError(f"stage {self.name!r}: mixture shares must be non-negative and sum to 1, got {parts}")

    @property
    def tokens(self) -> int: return self.steps * self.batch_size * self.seq_len

@dataclass(frozen=True)
class ExtensionRecipe(Config):
    "Pre-training length and base, then the stages in order."
    base_len: int
    base_theta: float
    stages: tuple[ExtensionStage, ...]

    def __post_init__(self):
        if not self.stages: raise ConfigError("an extension recipe needs at least one stage")
        lens = [self.base_len] + [s.seq_len for s in self.stages]
        if any(b <= a for a, b in zip(lens, lens[1:])):
            raise ConfigError(f"stage lengths must increase from the pre-training length: {lens}")
        if any(s.overlength for s in self.stages[:-1]): raise ConfigError("only the last stage can be over-length")
        last = self.stages[-1]
        if last.overlength:
            if len(self.stages) < 2: raise ConfigError("an over-length stage needs a target stage before it")
            target = self.stages[-2]
            if last.seq_len != 2 * target.seq_len:
                raise ConfigError(
                    f"the over-length stage trains at 2x the target ({2 * target.seq_len}), not {last.seq_len}"
                )
            if last.rope_theta != target.rope_theta:
                raise ConfigError("the over-length stage keeps the target stage's RoPE base")

    @property
    def target_len(self) -> int:
        "The advertised context: the last stage that is not over-length."
        return [s for s in self.stages if not s.overlength][-1].seq_len


def extension_recipe(base_len: int, base_theta: float, head_dim: int, lengths, *, steps, batch_sizes, peak_lr: float,
                     overlength: bool = True, sequence=None, final_lr_ratio: float = 0.1, warmup_steps: int = 10,
                     mixture: tuple = ExtensionStage.mixture, rope_rule: str = 'critical') -> ExtensionRecipe:
    """Stages at each of `lengths` with bases from `rope_rule` (see `rope_base_for`), plus an over-length stage at
    twice the last one. `steps`, `batch_sizes`, `sequence`: one value per stage (over-length included when
    `overlength`); `mixture`: every stage's."""
    lens = list(lengths) + ([2 * lengths[-1]] if overlength else [])
    sequence = sequence or [1] * len(lens)
    if not len(steps) == len(batch_sizes) == len(sequence) == len(lens):
        raise ConfigError(f"need one steps / batch size / sequence value per stage ({len(lens)} stages)")
    stages = []
    for i, L in enumerate(lens):
        over = overlength and i == len(lens) - 1
        theta = stages[-1].rope_theta if over else rope_base_for(base_theta, head_dim, base_len, L, rope_rule)
        stages.append(
            ExtensionStage(
                'overlength' if over else f'stage{i + 1}',
                L,
                theta,
                steps[i],
                batch_sizes[i],
                peak_lr,
                min(warmup_steps, steps[i]),
                peak_lr * final_lr_ratio,
                sequence[i],
                mixture,
                overlength=over,
            )
        )
    return ExtensionRecipe(base_len, base_theta, tuple(stages))

EXTENSION_PRESETS = {
    # the paper's shape at full scale: 8K -> 32K -> 128K, then 256K over-length, about 4M tokens per step
    'xgen': extension_recipe(
        8192,
        500_000.0,
        128,
        (32_768, 131_072),
        steps=(1000, 1000, 250),
        batch_sizes=(128, 32, 16),
        peak_lr=1e-5,
        sequence=(1, 4, 8),
    ),
    # the tiny model on a CPU: 512 -> 1K -> 2K, then 4K over-length
    # (sequence-parallel degrees fit the 8 host devices of the tests; one device runs it unsharded)
    # (critical-pair bases, peak lr a tenth of pre-training's and 80% retrieval documents: what the end of this notebook
    # measured)
    'cpu': extension_recipe(
        512,
        10_000.0,
        32,
        (1024, 2048),
        steps=(320, 320, 160),
        batch_sizes=(4, 2, 1),
        peak_lr=3e-4,
        sequence=(2, 4, 8),
        mixture=(('long_natural', 0.1), ('concatenated', 0.1), ('retrieval', 0.8)),
    ),
}

# %%
for name, r in EXTENSION_PRESETS.items():
    print(f'{name}: pre-trained at {r.base_len:,} (base {r.base_theta:,.0f}), target {r.target_len:,}')
    for s in r.stages:
        print(f'  {s.name:>10}: {s.seq_len:>7,} tokens  base {s.rope_theta:>12,.0f}  {s.steps:>5} steps x {s.batch_size:>3} rows '
              f'= {s.tokens:>13,} tokens  peak lr {s.peak_lr:.0e}  retrieval {dict(s.mixture)["retrieval"]:.0%}  sequence-parallel {s.sequence}')

# %%
r = EXTENSION_PRESETS['xgen']
test_eq([s.seq_len for s in r.stages], [32_768, 131_072, 262_144])
test_eq(r.target_len, 131_072)
test_eq(r.stages[-1].rope_theta, r.stages[-2].rope_theta)
test_eq(ExtensionRecipe.from_dict(json.loads(json.dumps(r.to_dict()))), r)
test_eq([s.seq_len for s in EXTENSION_PRESETS['cpu'].stages], [1024, 2048, 4096])
test_eq({s.peak_lr for s in EXTENSION_PRESETS['cpu'].stages}, {3e-4})                    # a tenth of pre-training's peak
test_eq(dict(EXTENSION_PRESETS['cpu'].stages[0].mixture)['retrieval'], 0.8)
test_eq([s.rope_theta for s in EXTENSION_PRESETS['cpu'].stages], [40_000.0, 160_000.0, 160_000.0])   # critical-pair bases
test_eq(extension_recipe(512, 1e4, 32, (2048,), steps=(1, 1), batch_sizes=(1, 1), peak_lr=1e-4, rope_rule='ntk').stages[0].rope_theta,
        rope_base_for(1e4, 32, 512, 2048, 'ntk'))
st = r.stages[0]
test_fail(lambda: ExtensionRecipe(8192, 5e5, (replace(st, seq_len=4096),)), contains='increase')
test_fail(lambda: ExtensionRecipe(8192, 5e5, (st, replace(r.stages[1], overlength=True, seq_len=100_000))), contains='2x the target')
test_fail(lambda: replace(st, mixture=(('retrieval', 0.5),)), contains='sum to 1')
test_fail(lambda: replace(st, mixture=(('books', 1.0),)), contains='unknown mixture')
test_fail(lambda: replace(st, sequence=3), contains='divide')

# %% [markdown]
# ## The long-document mixture
#
# Length extension only teaches long-range use if long-range dependencies are in the data. Most web and code
# documents are short (the sample corpus's median is about 400 tokens), so the stage mixture has three parts:
#
# * `long_natural`: documents that are long on their own (at least a quarter of the stage length);
# * `concatenated`: *related* documents joined into one: same domain, chained greedily so that each next
#   document shares the most words with the previous one (the idea of in-context pre-training, Shi et al.,
#   arXiv 2310.10638, with a cheap similarity);
# * `retrieval`: synthetic documents from notebook 19 (needles, multi-key, multi-query, multi-value, variable
#   tracking) at lengths spread over the stage length, each followed by its answer, plus "copy" documents that
#   repeat a random span after a gap. These are training data *of the same families* as the RULER evaluation,
#   drawn from disjoint seeds: what the evaluation then measures is whether the ability holds *at each length*.
#
# Shares are by tokens. A part that the corpus cannot fill (no document is long enough) hands its share to
# `concatenated`, and the returned counts say so.

# %%
#| export
RETRIEVAL_TASKS = ('niah_single', 'niah_multikey', 'niah_multiquery', 'niah_multivalue', 'vt')
TRAIN_SEED_OFFSET = 1_000_000        # training documents use seeds from here on; evaluation uses small seeds

def copy_document(tok: Tokenizer, length: int, rng) -> list:
    "A random span of key words and digits, a gap of noise, then the span again: in-context copying at a distance."
    pool = list(ruler.KEY_WORDS) + list('0123456789')
    span = tok.encode(' ' + ' '.join(str(w) for w in rng.choice(pool, int(rng.integers(3, 12)))))
    gap = int(rng.integers(0, max(1, length - 2 * len(span) - 12)))
    return (
        tok.encode(' Copy this:') + span + ruler.noise_tokens(tok, gap) + tok.encode(' Again:') + span + tok.encode('.')
    )

def recall_prompt(tok: Tokenizer, rng, digits: int = 5, max_gap: int = 24) -> tuple[list, str]:
    "A key-value recall prompt, `' key: 12345. <noise> key:'` (0 to `max_gap` noise tokens), and its answer `'12345'`."
    key, value = str(rng.choice(ruler.KEY_WORDS)), ruler._value(rng, digits)
    gap = int(rng.integers(0, max_gap + 1))
    return tok.encode(f' {key}: {value}.') + ruler.noise_tokens(tok, gap) + tok.encode(f' {key}:'), value

def recall_document(tok: Tokenizer, rng, digits: int = 5, max_gap: int = 24) -> list:
    "A short key-value recall document, `' key: 12345. <noise> key: 12345.'`: the densest retrieval signal there is."
    ids, value = recall_prompt(tok, rng, digits, max_gap)
    return ids + tok.encode(f' {value}.')

def recall_records(tok: Tokenizer, n_tokens: int, seed: int = 0, domain: str = 'recall') -> list[dict]:
    "Text records of `recall_document`s totalling about `n_tokens` tokens: a token store of them is a recall bootstrap."
    rng, out, n = np.random.default_rng(seed), [], 0
    while n < n_tokens:
        ids = recall_document(tok, rng)
        out.append(dict(text=tok.decode(ids), domain=domain)); n += len(ids)
    return out

def recall_accuracy(
    model: Decoder, tok: Tokenizer, n: int = 32, seed: int = 12_345, digits: int = 5, max_gap: int = 24
) -> float:
    "Greedy exact match of `model` on `n` recall prompts drawn from `seed` (keep it apart from the training "
    "documents' seed)."
    rng = np.random.default_rng(seed)
    prompts, values = zip(*(recall_prompt(tok, rng, digits, max_gap) for _ in range(n)))
    outs = generate(model, list(prompts), max_new_tokens=digits + 3, stop_tokens=[tok.eos_id], pad_id=tok.pad_id).tokens
    return float(np.mean([tok.decode(o).split('.')[0].strip() == v for v, o in zip(values, outs)]))

def retrieval_documents(tok: Tokenizer, n_tokens: int, max_len: int, seed: int = 0, tasks=RETRIEVAL_TASKS,
                        cfg: ruler.RulerConfig = ruler.RulerConfig(digits=5), copy_share: float = 0.3) -> list[list]:
    "Synthetic retrieval documents (token ids) totalling about `n_tokens`, each at most `max_len` tokens."
    docs, total, i = [], 0, 0
    while total < n_tokens:
        rng = np.random.default_rng([seed, i])
        s = TRAIN_SEED_OFFSET + seed * 1_000_003 + i
        i += 1
        if rng.random() < copy_share: d = copy_document(tok, int(rng.integers(64, max_len)), rng)
        else:
            task, budget = tasks[int(rng.integers(len(tasks)))], int(rng.integers(max_len // 8, max_len - 8))
            try: d = ruler.training_document(tok, task, budget, s, cfg)
            except ValueError: continue          # a task that does not fit this length: draw again
        docs.append(d[:max_len - 1]); total += len(docs[-1])
    return docs

def _related_chains(docs: list[dict], lengths: list[int], target: int, rng) -> list[list[int]]:
    "Greedy chains of same-domain documents, each next one the most word-overlapping of a random candidate pool."
    chains = []
    by_domain = {}
    for i, d in enumerate(docs): by_domain.setdefault(d['domain'], []).append(i)
    words = [set(d['text'].lower().split()) for d in docs]
    for dom, idx in sorted(by_domain.items()):
        left = [int(i) for i in rng.permutation(idx)]
        while left:
            chain, n = [left.pop()], 0
            n = lengths[chain[0]]
            while n < target and left:
                pool = left[:64]
                best = max(
                    pool, key=lambda j: len(words[chain[-1]] & words[j]) / (len(words[chain[-1]] | words[j]) or 1)
                )
                left.remove(best); chain.append(best); n += lengths[best]
            if n >= target // 2: chains.append(chain)
    return chains

def long_context_records(
    tok: Tokenizer,
    docs: list[dict],
    seq_len: int,
    n_tokens: int,
    mixture=ExtensionStage.mixture,
    seed: int = 0,
    retrieval_cfg: ruler.RulerConfig = ruler.RulerConfig(digits=5),
) -> tuple[list, dict]:
    """Text records (`text`, `domain` = mixture part) for one stage: about `n_tokens` in `mixture` shares.
    `docs`: natural documents (dicts with `text` and `domain`). Returns the records and the tokens per part."""
    if not docs: raise ValueError("long_context_records needs natural documents")
    rng = np.random.default_rng(seed)
    shares = dict(mixture)
    lengths = [len(ids) for ids in tok.encode_batch([d['text'] for d in docs], errors='replace')]
    want = {p: int(shares.get(p, 0) * n_tokens) for p in MIXTURE_PARTS}
    out, got = [], dict.fromkeys(MIXTURE_PARTS, 0)
    long_idx = [int(i) for i in rng.permutation(len(docs)) if lengths[i] >= seq_len // 4]
    for i in long_idx:
        if got['long_natural'] >= want['long_natural']: break
        out.append(dict(text=docs[i]['text'], domain='long_natural')); got['long_natural'] += lengths[i]
    want['concatenated'] += max(0, want['long_natural'] - got['long_natural'])   # not enough long documents
    sep = '\n\n'
    while got['concatenated'] < want['concatenated']:
        chains = _related_chains(docs, lengths, seq_len, rng)
        if not chains: raise ValueError(f"the documents cannot be chained to {seq_len // 2} tokens or more")
        for c in chains:
            if got['concatenated'] >= want['concatenated']: break
            out.append(dict(text=sep.join(docs[j]['text'] for j in c), domain='concatenated'))
            got['concatenated'] += sum(lengths[j] for j in c)
    if want['retrieval']:
        for ids in retrieval_documents(tok, want['retrieval'], seq_len, seed, cfg=retrieval_cfg):
            out.append(dict(text=tok.decode(ids), domain='retrieval')); got['retrieval'] += len(ids)
    order = rng.permutation(len(out))
    return [out[i] for i in order], got

def write_store(records: list[dict], tok: Tokenizer, out_dir) -> TokenStore:
    "Tokenise text `records` (with `domain`) into a token store at `out_dir` (one pass, every document once)."
    out_dir = Path(out_dir); out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / 'records.jsonl.gz'
    with gzip.open(src, 'wt', encoding='utf-8') as f:
        for r in records: f.write(json.dumps(dict(text=r['text'], domain=r['domain'])) + '\n')
    return build_token_store([src], tok, out_dir)

# %%
from xgen_small.data.sample import load_sample
from xgen_small.tokenizer import train_tokenizer
sample = load_sample()
tok = Tokenizer(train_tokenizer([d['text'] for d in sample[:600]], 4096))
recs, counts = long_context_records(tok, sample, 2048, 200_000, seed=0)
print({k: f'{v:,} tokens ({v / sum(counts.values()):.0%})' for k, v in counts.items()}, f'{len(recs)} documents')
for part in MIXTURE_PARTS:
    r = next(x for x in recs if x['domain'] == part)
    print(f'--- {part} ({len(tok.encode(r["text"])):,} tokens):', r['text'][:160].replace('\n', ' '), '...')

# %%
test_close(sum(counts.values()), 200_000, eps=20_000)
for p, s in ExtensionStage.mixture: test_close(counts[p] / sum(counts.values()), s, eps=0.05)
rec2, _ = long_context_records(tok, sample, 2048, 200_000, seed=0)
test_eq([r['text'] for r in rec2], [r['text'] for r in recs])              # deterministic for a seed
ret = [len(tok.encode(r['text'])) for r in recs if r['domain'] == 'retrieval']
assert max(ret) <= 2048 and min(ret) < 600, (min(ret), max(ret))         # spread over the stage length, none too long
test_fail(lambda: long_context_records(tok, [], 2048, 1000), contains='natural documents')

# %% [markdown]
# `recall_document` is not part of the stage mixture: it is the bootstrap that comes *before* any long-context
# training (see the end of this notebook). `recall_prompt` gives the same document without its answer, and
# `recall_accuracy` scores a model's greedy continuation of such prompts, from a seed of its own. `recall_records` turns many
# documents into text records for a token store: the pipeline's copy bootstrap (notebook 40) trains on them.

# %%
prompt, answer = recall_prompt(tok, np.random.default_rng(0))
print(repr(tok.decode(prompt)), '->', answer)

# %%
from xgen_small.config import get_preset
test_eq(recall_document(tok, np.random.default_rng(0)), prompt + tok.encode(f' {answer}.'))   # the prompt, then its answer
test_eq(tok.decode(prompt).count(answer), 1)
boot = recall_records(tok, 2_000, seed=0)                                   # about 2,000 tokens of them, reproducibly
test_eq({r['domain'] for r in boot}, {'recall'}); test_eq(boot, recall_records(tok, 2_000, seed=0))
test_close(sum(len(tok.encode(r['text'])) for r in boot), 2_000, eps=300)
test_eq(recall_accuracy(Decoder(get_preset('tiny'), rngs=nnx.Rngs(0)), tok, n=4), 0.0)         # an untrained model recalls nothing

# %% [markdown]
# ## Running the stages
#
# `extend` trains each stage with the training loop of notebook 18, starting from the previous stage's weights
# (fresh optimizer state, its own warmup and cosine decay), with the model config changed only where the stage
# says: the RoPE base and the longest length. On a mesh with a `sequence` axis the stage uses the ring
# sequence-parallel attention; otherwise the platform's memory-linear kernel (blockwise JAX on CPU beyond 512
# tokens, flash on GPU, splash on TPU). Each stage writes its own run directory, so an interrupted extension
# resumes inside the stage it was in, and finished stages are skipped.

# %%
#| export
def stage_model_config(base: ModelConfig, stage: ExtensionStage) -> ModelConfig:
    """The model config for training `stage`: new RoPE base, room for the stage length, sequence-parallel attention if
    sharded."""
    impl = (
        'seq_ring'
        if stage.sequence > 1
        else ('auto' if base.attention_impl.startswith('seq_') else base.attention_impl)
    )
    return base.replace(rope_theta=float(stage.rope_theta), max_seq_len=max(base.max_seq_len, stage.seq_len),
                        attention_impl=impl, rope_scaling='none', rope_factor=1.0)

def stage_mesh(stage: ExtensionStage, n_devices: int, base: MeshConfig = MeshConfig()) -> MeshConfig:
    """The mesh for `stage` on `n_devices`: the stage's sequence-parallel degree (or the largest divisor of the
    device count below it), FSDP over the rest."""
    seq = max(d for d in range(1, min(stage.sequence, n_devices) + 1) if n_devices % d == 0 and stage.seq_len % d == 0)
    fsdp = n_devices // seq
    if stage.batch_size % fsdp:
        raise ConfigError(
            f"stage {stage.name!r}: {n_devices} devices with sequence-parallel {seq} leave {fsdp} for the batch, "
            f"which {stage.batch_size} rows do not divide; raise the stage's sequence or batch_size"
        )
    return replace(base, data=1, fsdp=fsdp, sequence=seq, tensor=1)

def stage_train_config(base: TrainConfig, stage: ExtensionStage, n_devices: int | None = None) -> TrainConfig:
    "A `TrainConfig` for `stage` on `n_devices` (default: all), keeping `base`'s optimizer settings and seed."
    mesh = stage_mesh(stage, n_devices or jax.device_count(), base.mesh)
    stage = replace(stage, sequence=mesh.sequence)
    sched = (LRPhase(stage.name, stage.steps, stage.peak_lr, stage.warmup_steps, 'cosine', stage.final_lr),)
    return replace(
        base,
        model=stage_model_config(base.model, stage),
        seq_len=stage.seq_len,
        batch_size=stage.batch_size,
        grad_accum=1,
        schedule=sched,
        mesh=mesh,
        split='boundary',
    )

def eval_config(cfg: ModelConfig) -> ModelConfig:
    "The extended model's config for inference on any device: the stage's base, unsharded attention."
    return cfg.replace(attention_impl='auto') if cfg.attention_impl.startswith('seq_') else cfg

@dataclass
class ExtensionResult:
    params: dict
    model_config: ModelConfig
    stages: list                     # per stage: name, seq_len, rope_theta, tokens, final loss, seconds
    history: dict = field(default_factory=dict)

    def model(self) -> Decoder:
        "The extended model, ready for evaluation."
        return model_with_params(self.model_config, self.params)

def extend(recipe: ExtensionRecipe, params: dict, train_cfg: TrainConfig, tok: Tokenizer, docs: list[dict], out_dir, *,
           progress: bool = True, peak_flops: float | None = None, steps_scale: float = 1.0) -> ExtensionResult:
    """Run every stage of `recipe` from pre-trained `params` (of `train_cfg.model`), building each stage's
    long-document store from `docs`. Resumable: finished stages are reloaded, an interrupted one resumes."""
    out_dir = Path(out_dir); out_dir.mkdir(parents=True, exist_ok=True)
    if train_cfg.model.rope_theta != recipe.base_theta:
        raise ConfigError(
            f"the pre-trained model has RoPE base {train_cfg.model.rope_theta}, the recipe starts from "
            f"{recipe.base_theta}"
        )
    (out_dir / 'recipe.json').write_text(json.dumps(recipe.to_dict(), indent=1))
    rows, history = [], {}
    for i, stage in enumerate(recipe.stages):
        if steps_scale != 1.0:
            stage = replace(
                stage,
                steps=max(1, round(stage.steps * steps_scale)),
                warmup_steps=min(stage.warmup_steps, max(1, round(stage.steps * steps_scale))),
            )
        cfg = stage_train_config(train_cfg, stage)
        sdir = out_dir / stage.name
        store_dir = sdir / 'data'
        if not (store_dir / 'meta.json').exists():
            need = int(stage.tokens * 1.1) + stage.seq_len * stage.batch_size
            recs, _ = long_context_records(tok, docs, stage.seq_len, need, stage.mixture, seed=train_cfg.seed + i)
            write_store(recs, tok, store_dir)
        t0 = time.perf_counter()
        res = train(cfg, store_dir, sdir, progress=progress, peak_flops=peak_flops, init_params=params)
        params = jax.device_get(res.state['params'])
        hist = (
            [json.loads(l) for l in (sdir / 'history.jsonl').read_text().splitlines()]
            if (sdir / 'history.jsonl').exists()
            else res.history
        )
        history[stage.name] = hist
        rows.append(dict(stage=stage.name, seq_len=stage.seq_len, rope_theta=stage.rope_theta, tokens=stage.tokens,
                         loss=hist[-1]['loss'] if hist else float('nan'), seconds=round(time.perf_counter() - t0, 1)))
    return ExtensionResult(params, eval_config(cfg.model), rows, history)

# %% [markdown]
# ## The point of the stages, on the tiny model: the collapse, and the recovery
#
# The demonstration this notebook ends with: a model pre-trained at 512 tokens retrieves a passkey at 512 but not
# beyond, and after 1K, 2K and the 4K over-length stage retrieves at 2K, four times its pre-training length, with
# at least 90% exact match. **With the CPU preset it scores 100% at 2K (48 of 48 prompts), from 6% before
# extension.** The scripts that measure it (`benchmarks/retrieval_probe.py`, `benchmarks/long_context_demo.py`)
# take minutes each on 2 cores, too long for this notebook's CI run, so their results are tables here. This is a
# side demonstration, with its own retrieval bootstrap and 320 / 320 / 160 extension steps: the main command
# (`xgen-small run`, notebook 40), whose 160 pre-training steps on natural text form no copy circuit and whose
# extension stages have 24 / 24 / 8 steps, scores 0% passkey at every length before and after extension; folding
# the bootstrap into it is issue 21, still open (`--set copy_bootstrap=300` runs a recall bootstrap before the main
# command's pre-training; it forms part of the skill, not enough for passkey: notebook 40). Getting there took three findings, in order: the circuit has to exist, the extension must not wipe it, and the RoPE
# base must hold every slow pair, not only the slowest.
#
# **Retrieval has to exist before it can be extended, and the tiny model can learn it in minutes.** Retrieval
# needs a copy circuit (an induction head, Olsson et al., 2022). `benchmarks/retrieval_probe.py` trains the tiny
# model with a minimal loop on synthetic documents and logs teacher-forced accuracy on the answer tokens:
#
# | data (16-32 rows, lr 3e-3, no weight decay) | what happened |
# |---|---|
# | `niah_single` prompts of 96-256 tokens, from scratch, 1,000 steps | answer digits at chance throughout (answer loss 1.65 = 5/7 ln 10): 5 answer tokens in ~170 are too sparse a signal to start the circuit |
# | random spans repeated (225 pieces), 600 steps | chance throughout |
# | key-value recall (`recall_document`), 128-token rows | forms at 200-300 steps (seed 0: answer accuracy 36 / 70 / 94 / 99% at steps 100-400) or 300-500 (seeds 1, 2); greedy recall 97-100% |
# | then `niah_single` at 256 tokens, 300 steps | answer accuracy 98% after 100 steps; passkey 94 / 100 / 38% at 256 / 512 / 1K (seed 0), 100 / 38 / 12% (seed 1) |
#
# So a dense recall task bootstraps the circuit, and a passkey learned at 256 tokens is solid there and fades
# beyond it. (The earlier attempt's bootstrap used lr 1e-2 and stayed at chance; at 3e-3 the circuit forms.)
#
# **Not every recall circuit transfers to needles.** Trained with `train` (notebook 18) instead of the probe's
# loop, the same bootstrap reached 78-94% recall, but `niah_single` training from it stayed low (6-31% at 256
# after 150 steps, against 100% from the probe's). Scoring recall three ways tells the circuits apart: plain
# prompts, prompts behind 20-60 noise tokens (the pair no longer starts the document), and prompts with a second,
# distracting pair. The probe's bootstraps score 98-100 / 85-100 / 15-35% (four runs); `train`'s 79-92 / 50-81 /
# 0-8% (four runs). A needle sits mid-document, so a circuit that leans on "the value near the start" fails it.
# Yet the two loops compute the same step: on the same batches and initial parameters, `train`'s jitted step and
# the probe's agree on loss, gradients and learning rate, and on the parameters after 8 steps to 1e-7. From the
# *same* initialisation and batches, 600 steps later, the probe's run scored 98 / 94 / 17 and `train`'s
# 90 / 81 / 8: float rounding alone sends the runs to different circuits. Why all four probe runs landed on the
# transferable side and no `train` run did, we do not know; a bootstrap with distracting pairs (which would force matching the key) did not form in 800
# steps from scratch, nor in 300 more from a formed circuit (distractor recall 4% -> 8%). The tables below use
# the probe's seed-1 bootstrap (`long_context_demo.py --bootstrap`); the demo's default bootstrap through `train`
# runs the same recipe with a circuit that may transfer worse.
#
# **The pre-trained model** (`benchmarks/long_context_demo.py --bootstrap`: 300 steps of `niah_single` at 256,
# then 150 steps at 512 of 70% needle documents and 30% natural text; 48 prompts per length):
#
# | passkey (`niah_single`, 5 digits) | 256 | 512 | 1K | 2K | 4K |
# |---|---:|---:|---:|---:|---:|
# | after the needle phase at 256 | 98 | 52 | 21 | | |
# | pre-trained at 512 | | 83 | 25 | 6 | 0 |
#
# the collapse beyond the pre-training length that the stages are for.
#
# **Extension: keep the circuit, then stretch it.** The CPU recipe's stages (1K, 2K, then 4K over-length) from
# that model, with the learning rate, mixture, steps and RoPE bases varied. Passkey exact match, % (24 prompts per
# length, where the pre-trained model scored 88 / 33 / 4 / 0; 48 where marked):
#
# | extension (same pre-trained model) | 512 | 1K | 2K | 4K |
# |---|---:|---:|---:|---:|
# | NTK bases; peak lr 3e-3, mixture 30 / 30 / 40, 80 / 80 / 40 steps (the first preset) | 0 | 0 | 0 | 0 |
# | NTK bases; peak lr 3e-4, mixture 30 / 30 / 40 | 33 | 33 | 4 | 0 |
# | NTK bases; peak lr 3e-4, mixture 10 / 10 / 80 | 92 | 79 | 29 | 12 |
# | NTK bases; peak lr 1e-3, mixture 10 / 10 / 80 | 58 | 38 | 25 | 8 |
# | NTK bases; peak lr 3e-4, mixture 10 / 10 / 80, twice the steps (160 / 160 / 80) | 100 | 88 | 50 | 12 |
# | NTK bases; as above, four times the steps (320 / 320 / 160): the previous preset | 92 | 83 | 67 | 29 |
# | as twice the steps, but the RoPE base kept at 10,000 | 96 | 62 | 21 | 8 |
# | NTK bases, twice the steps, needle-heavy retrieval documents\* | 96 | 92 | 58 | 12 |
# | as the row above, over-length stage 320 steps\* | 100 | 100 | 62 | 33 |
# | as the row above, retrieval documents of L/2 to L tokens instead of L/8 to L\* | 96 | 88 | 58 | 21 |
# | linear position interpolation (factors 2, 4, 4) instead of larger bases, 80 / 80 / 40 steps, needle-heavy\* | 0 | 0 | 0 | 0 |
# | NTK bases, four times the steps, half the task documents far-needle\*\* | 83 | 46 | 62 | 17 |
# | **critical-pair bases (40,000, 160,000, 160,000), otherwise the previous preset: the CPU preset now** (48 prompts) | **98** | **100** | **100** | **73** |
# | every stage at base 640,000 (the critical-pair base for 4K), otherwise the preset | 100 | 100 | 100 | 100 |
# | as the row above, half the task documents far-needle\*\* | 88 | 83 | 96 | 88 |
#
# (\* needle-heavy: the retrieval tasks patched to 60% `niah_single`, 20% multi-key, 20% multi-query and 10% copy
# documents; \*\* half the retrieval task documents made 3/4 to all of the stage length with their needles in the
# first quarter of the haystack; both exploratory, not repository options.) At the pre-training peak lr the fresh
# optimizer wipes the circuit; at a tenth of it the mixture decides: with 40% retrieval, spread over five task
# families and copy documents, natural text the model barely fits dominates the gradient. At 80% retrieval the
# stages do what they are for, and every doubling of the steps helps 2K and 4K under NTK bases. A larger base
# matters (kept at 10,000, 1K and 2K fall from 88 / 50 to 62 / 21); position interpolation, which squeezes every
# distance back into the pre-trained range, breaks the model outright at this budget, since it also squeezes the
# short distances every local pattern was learned at. But the base that matters most is the critical-pair one.
#
# **Why NTK bases stopped at 67%: distance, not length.** Splitting the prompts by how far the needle sits before
# the question showed a wall. An NTK-based model (the patched task mix above, over-length stage doubled; 100 / 100
# / 62 / 33 overall; 48 prompts per length):
#
# | prompts | nearest quarter | second | third | farthest quarter |
# |---|---:|---:|---:|---:|
# | 2K: needle distance from the question (tokens) | 46-488 | 488-820 | 970-1,489 | 1,592-1,978 |
# | 2K: exact match, % (12 prompts each) | 100 | 100 | 100 | 8 |
# | 4K: needle distance from the question (tokens) | 50-1,159 | 1,270-1,979 | 2,064-3,065 | 3,331-3,977 |
# | 4K: exact match, % (12 prompts each) | 92 | 33 | 8 | 0 |
#
# Within about 1,500 tokens it retrieved almost perfectly, beyond almost never, at either prompt length. The wall
# is where the NTK base lets the slow pairs leave their pre-trained arcs: under base 43,873, pair 8 (wavelength
# 628 tokens at base 10,000, so it swept only part of a turn in 512-token pre-training) reaches new angles from
# 1,072 tokens on, pairs 9-14 a little later (see `unseen_angle_distance` above). Two fixes were tried. More data
# at long distances (far-needle documents) did not help: under NTK bases it gave 62% at 2K, and under large bases
# it cost accuracy, perhaps because needles the model cannot yet reach teach it to guess digits (its 1K errors were
# one digit replaced, mostly by a 0 or a 9). Holding every slow pair in its arc did: with critical-pair bases new angles
# start exactly at the stage length, and the wall is gone up to it.
#
# **The preset end to end** (`python benchmarks/long_context_demo.py --bootstrap <the probe's seed-1 checkpoint> --n 48`),
# by the needle's depth in the prompt (0% is the start, the farthest from the question; prompts per cell in brackets):
#
# | passkey by needle depth | 0-25% | 25-50% | 50-75% | 75-100% |
# |---|---:|---:|---:|---:|
# | pre-trained, 1K | 0 (13) | 0 (14) | 58 (12) | 56 (9) |
# | pre-trained, 2K | 0 (12) | 0 (11) | 0 (12) | 23 (13) |
# | extended, 1K | 100 (13) | 100 (14) | 100 (12) | 100 (9) |
# | extended, 2K | 100 (12) | 100 (11) | 100 (12) | 100 (13) |
# | extended, 4K | 8 (13) | 100 (11) | 94 (18) | 100 (6) |
#
# At 4K, past the target, the farthest quarter still fails: the over-length stage keeps the 2K stage's base
# (the recipe's rule, as the paper evaluates at the target), so angles beyond 2,048 tokens are new, and 160
# over-length steps teach only part of them; with the 4K critical-pair base in every stage (the 640,000 row) 4K
# holds too. Natural-text loss by position falls by 0.5 to 0.7 nats at every position up to 4K (0-512: 6.98 -> 6.38;
# 3,584-4,096: 6.86 -> 6.32). The extension took 778 s alone on the 2 cores (1,379 s in the demo's run, beside another job).
#
# What the stages do *not* give the tiny model is the harder tasks. With `--ruler 8` the demo scores every RULER
# task: after extension `niah_single` is 100 / 100 / 75% at 1K / 2K / 4K, and multi-key, multi-value, multi-query,
# variable tracking, common and frequent words are all 0% at every length, before and after, although four of them
# are 80% of the retrieval training documents. Picking the asked key among four look-alike needles, or returning
# several values, is a skill this 1.8M-parameter model never formed (its bootstrap circuits already failed
# distracting pairs, above); extension carries a skill to longer contexts, it does not create one.
#
# The extension machinery itself (stages, RoPE bases, mixture, sequence-parallel training on 2-, 4- and 8-way
# rings, resumption) is exercised end to end by `tests/test_extend.py` and the CLI.

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
