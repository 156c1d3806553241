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
# # Generation
#
# > Compiled KV-cache decoding: greedy, temperature, top-k and top-p sampling, stop tokens, ragged prompts.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/15_generate.ipynb)

# %%
#| default_exp generate

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
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xgen_small.config import Config
from xgen_small.model import Decoder, KVCache, check_tokens

# %%
from fastcore.test import test_eq, test_close, test_fail
import time
from xgen_small.config import get_preset
from xgen_small.model import model_with_params, params_of


# %% [markdown]
# ## Choosing the next token
#
# One function turns the last position's logits into a token. Greedy decoding takes the argmax;
# sampling divides the logits by a temperature and then restricts the candidates:
#
# - **top-k** keeps the $k$ most likely tokens;
# - **top-p** (nucleus sampling, Holtzman et al., 2019, arXiv 1904.09751) keeps the smallest set of
#   most likely tokens whose probabilities sum to at least $p$.
#
# Both filters need the logits in descending order, so one sort serves both. Sorting the vocabulary
# costs more than the tiny model's whole forward pass on a CPU, so `jax.lax.cond` skips the sort
# when neither filter is on, and greedy decoding skips sampling altogether. Every knob is a traced
# value, not a Python constant: changing the temperature does not recompile anything. (Tokens that
# tie exactly with the $k$-th logit are all kept.)

# %%
#| export
@dataclass(frozen=True)
class Sampling(Config):
    "How to pick each token: `temperature=0` is greedy; `top_k=0` and `top_p=1` switch those filters off."
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0: raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1: raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

def _nucleus_threshold(scaled, top_k, top_p):
    "The smallest logit that survives the top-k and top-p filters, per row (one descending sort serves both)."
    desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, scaled.shape[-1]), scaled.shape[-1])
    kth = jnp.take_along_axis(desc, jnp.broadcast_to(k - 1, desc.shape[:-1])[..., None], axis=-1)
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p        # the nucleus, in sorted order
    return jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)

def sample_token(logits: jax.Array, key, temperature, top_k, top_p) -> jax.Array:
    "Token ids `[batch]` drawn from float `logits` `[batch, vocab]` (greedy where `temperature == 0`)."
    logits = logits.astype(jnp.float32)
    def draw(logits):
        scaled = logits / temperature
        filtered = jax.lax.cond(
            (top_k > 0) | (top_p < 1),  # sorting the vocabulary is the costly part: skip it when unused
            lambda s: jnp.where(s >= _nucleus_threshold(s, top_k, top_p), s, -jnp.inf),
            lambda s: s,
            scaled,
        )
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    return jax.lax.cond(temperature > 0, draw, lambda l: jnp.argmax(l, axis=-1).astype(jnp.int32), logits)


# %% [markdown]
# On a toy distribution over five tokens, 4,000 draws each:

# %%
toy = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.07, 0.03]]))
def freqs(**kw):
    s = Sampling(**kw)
    draw = jax.vmap(lambda key: sample_token(toy, key, s.temperature, s.top_k, s.top_p)[0])
    return np.bincount(np.asarray(draw(jax.random.split(jax.random.key(0), 4000))), minlength=5) / 4000
for kw in (dict(), dict(temperature=1.0), dict(temperature=1.0, top_k=2), dict(temperature=1.0, top_p=0.8), dict(temperature=0.3)):
    print(f'{str(kw):38}', freqs(**kw).round(3))

# %%
test_eq(freqs().tolist(), [1.0, 0, 0, 0, 0])                           # greedy
test_close(freqs(temperature=1.0), [0.5, 0.25, 0.15, 0.07, 0.03], eps=0.03)
test_eq(freqs(temperature=1.0, top_k=2)[2:].sum(), 0.0)
test_close(freqs(temperature=1.0, top_k=2)[:2], [2 / 3, 1 / 3], eps=0.03)
test_eq(freqs(temperature=1.0, top_p=0.8)[3:].sum(), 0.0)               # 0.5 + 0.25 < 0.8: three tokens needed
test_close(freqs(temperature=1.0, top_p=0.8)[:3], np.array([0.5, 0.25, 0.15]) / 0.9, eps=0.03)
test_fail(lambda: Sampling(top_p=0.0), contains='top_p')
test_fail(lambda: Sampling(temperature=-1.0), contains='temperature')


# %% [markdown]
# ## The decode loop
#
# Prompts of different lengths are **left-padded** to a common length, so that every row's last
# prompt token sits in the same column and all rows step forward together. Padding gets segment id 0
# and real tokens segment id 1; positions count from 0 at each row's first real token. The attention
# mask (notebook 11) then keeps padding invisible, and RoPE sees the same positions as it would
# without any padding.
#
# The whole loop runs inside one `jax.jit`: a prefill pass writes the prompts into the KV cache,
# then a `jax.lax.while_loop` samples a token, feeds it back through the model, and stops as soon as
# every row has produced a stop token or the budget is spent. No Python runs between tokens, which
# is where most of the speed comes from on small models. Prompt lengths are rounded up to a multiple
# of `bucket`, so that a new prompt length rarely means a new compilation.
#
# **Long prompts are prefilled in chunks.** A prefill that pushes a whole prompt through the model at once computes
# a `[prompt, prompt]` score matrix per head: for the tiny model a 32K-token prompt compiles to about 33 GiB of
# temporary memory on a CPU, which is why no long-context evaluation could run. With `prefill_chunk=C`, the prompt
# goes in `C` tokens at a time, each chunk attending to the cache written so far (its keys are the cache's slots,
# masked by segment and position exactly as in one pass) in `[512, 512]` tiles (blockwise by position, notebook 12),
# so no score matrix larger than a tile exists and memory grows linearly with the prompt. The chunks run in a `jax.lax.fori_loop`, one compiled body for all of them; a prompt whose length
# is not a multiple of `C` starts with one shorter chunk. The result is the same computation reordered: the tests
# below check that chunked and one-pass prefill produce the same tokens, and measure the memory.

# %%
#| export
@dataclass
class Generation:
    "New tokens per prompt (the stop token excluded) and the stop token that ended each one (None: length limit)."
    tokens: list[list[int]]
    stop_tokens: list[int | None]

def _left_pad(prompts: Sequence[Sequence[int]], width: int, pad_id: int):
    B = len(prompts)
    tokens = np.full((B, width), pad_id, np.int32)
    segment_ids = np.zeros((B, width), np.int32)
    positions = np.zeros((B, width), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        tokens[i, width - n:], segment_ids[i, width - n:], positions[i, width - n:] = p, 1, np.arange(n)
    return tokens, segment_ids, positions

def _check_prompts(prompts, vocab_size: int, max_new_tokens: int, max_seq_len: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        p = np.asarray(p)
        if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer):
            raise ValueError(f"prompt {i} must be a non-empty list of int token ids")
        out.append(p.tolist())
    check_tokens(np.concatenate([np.asarray(p) for p in out]), vocab_size)
    if not (isinstance(max_new_tokens, int) and max_new_tokens > 0):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    longest = max(map(len, out))
    if longest + max_new_tokens > max_seq_len:
        raise ValueError(
            f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={max_seq_len}"
        )
    return out

def _prefill(model, tokens, positions, segment_ids, cache, chunk: int):
    "Write the prompts into `cache`, `chunk` tokens at a time (a first, shorter chunk takes the remainder)."
    P = tokens.shape[1]
    if P <= chunk: return model.forward(tokens, positions, segment_ids, cache, last_only=True)
    r = P % chunk or chunk
    logits, cache = model.forward(tokens[:, :r], positions[:, :r], segment_ids[:, :r], cache, last_only=True)

    def one(i, carry):
        cut = lambda a: jax.lax.dynamic_slice_in_dim(a, r + i * chunk, chunk, axis=1)
        return model.forward(cut(tokens), cut(positions), cut(segment_ids), carry[1], last_only=True)
    return jax.lax.fori_loop(0, (P - r) // chunk, one, (logits, cache))

@partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'chunk'))
def _decode(graphdef, state, tokens, segment_ids, positions, key, temperature, top_k, top_p, stop_ids, max_new_tokens,
            chunk: int = 1024):
    model = nnx.merge(graphdef, state)
    B, P = tokens.shape
    cache = KVCache.create(model.cfg, B, P + max_new_tokens)
    logits, cache = _prefill(model, tokens, positions, segment_ids, cache, chunk)
    next_pos = positions[:, -1] + 1
    out = jnp.full((B, max_new_tokens), -1, jnp.int32)

    def cond(carry):
        step, _, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, last, key, out, done = carry
        key, sub = jax.random.split(key)
        tok = sample_token(last, sub, temperature, top_k, top_p)
        out = out.at[:, step].set(jnp.where(done, -1, tok))
        done = done | jnp.isin(tok, stop_ids)
        logits, cache = model.forward(tok[:, None], (next_pos + step)[:, None], jnp.ones((B, 1), jnp.int32), cache)
        return step + 1, cache, logits[:, 0], key, out, done

    carry = (jnp.int32(0), cache, logits[:, -1], key, out, jnp.zeros(B, bool))
    return jax.lax.while_loop(cond, body, carry)[4]

def _finish(out: np.ndarray, stop_tokens) -> Generation:
    tokens, stops, stop_set = [], [], set(stop_tokens)
    for row in out.tolist():
        row = [t for t in row if t >= 0]
        cut = next((j for j, t in enumerate(row) if t in stop_set), None)
        tokens.append(row if cut is None else row[:cut]); stops.append(None if cut is None else row[cut])
    return Generation(tokens, stops)

def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    *,
    sampling: Sampling = Sampling(),
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    pad_id: int = 0,
    bucket: int = 16,
    prefill_chunk: int = 1024,
) -> Generation:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens`, stopping a row at any of `stop_tokens`.
    Prompts longer than `prefill_chunk` tokens are prefilled that many at a time (memory linear in their length)."""
    if not (isinstance(prefill_chunk, int) and prefill_chunk > 0):
        raise ValueError(f"prefill_chunk must be a positive int, got {prefill_chunk!r}")
    cfg = model.cfg
    prompts = _check_prompts(prompts, cfg.vocab_size, max_new_tokens, cfg.max_seq_len)
    check_tokens(np.asarray(list(stop_tokens) + [pad_id], np.int64), cfg.vocab_size)
    longest = max(map(len, prompts))
    width = min(-(-longest // bucket) * bucket, cfg.max_seq_len - max_new_tokens)
    tokens, segment_ids, positions = _left_pad(prompts, width, pad_id)
    graphdef, state = nnx.split(model)
    stop_ids = jnp.asarray(list(stop_tokens) or [-2], jnp.int32)
    out = _decode(
        graphdef,
        state,
        tokens,
        segment_ids,
        positions,
        jax.random.key(seed),
        jnp.float32(sampling.temperature),
        jnp.int32(sampling.top_k),
        jnp.float32(sampling.top_p),
        stop_ids,
        max_new_tokens,
        prefill_chunk,
    )
    return _finish(np.asarray(out), stop_tokens)


# %% [markdown]
# A freshly initialised tiny model knows nothing, so its continuations are noise, but they are
# deterministic noise, which is all the following checks need.

# %%
cfg = get_preset('tiny')
model = Decoder(cfg, rngs=nnx.Rngs(0))
prompts = [[5, 17, 42], list(range(100, 120)), [7]]
g = generate(model, prompts, max_new_tokens=12)
for p, t in zip(prompts, g.tokens): print(f'prompt of {len(p):2d} tokens -> {t}')


# %% [markdown]
# ## Reference twin: decoding without a cache
#
# The cache is an optimisation, so it must not change a single token. `generate_reference` recomputes
# the full forward pass over the whole sequence for every new token (quadratic work, no cache), with
# the same padding, positions, sampler and random keys. To compile once rather than once per
# length, it writes into a fixed buffer whose not-yet-generated slots have segment id 0 (invisible).

# %%
#| export
@partial(jax.jit, static_argnames='graphdef')
def _step_reference(graphdef, state, tokens, positions, segment_ids, column, key, temperature, top_k, top_p):
    logits = nnx.merge(graphdef, state)(tokens, positions, segment_ids)   # the full sequence, every time
    return sample_token(
        jax.lax.dynamic_index_in_dim(logits, column, axis=1, keepdims=False), key, temperature, top_k, top_p
    )

def generate_reference(model: Decoder, prompts, max_new_tokens: int = 32, *, sampling: Sampling = Sampling(),
                       stop_tokens=(), seed: int = 0, pad_id: int = 0, bucket: int = 16) -> Generation:
    "Same contract as `generate`, recomputing every step without a KV cache (slow; for testing)."
    cfg = model.cfg
    prompts = _check_prompts(prompts, cfg.vocab_size, max_new_tokens, cfg.max_seq_len)
    longest = max(map(len, prompts))
    width = min(-(-longest // bucket) * bucket, cfg.max_seq_len - max_new_tokens)
    tok, seg, pos = (np.pad(a, ((0, 0), (0, max_new_tokens))) for a in _left_pad(prompts, width, pad_id))
    pos[:, width:] = pos[:, width - 1:width] + 1 + np.arange(max_new_tokens)
    graphdef, state = nnx.split(model)
    knobs = jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p)
    key, done = jax.random.key(seed), np.zeros(len(prompts), bool)
    out = np.full((len(prompts), max_new_tokens), -1, np.int32)
    for step in range(max_new_tokens):
        if done.all(): break
        key, sub = jax.random.split(key)
        t = np.asarray(_step_reference(graphdef, state, tok, pos, seg, width + step - 1, sub, *knobs))
        out[:, step] = np.where(done, -1, t)
        done |= np.isin(t, list(stop_tokens))
        tok[:, width + step], seg[:, width + step] = t, 1
    return _finish(out, stop_tokens)


# %%
for s in (Sampling(), Sampling(temperature=1.0), Sampling(temperature=0.8, top_k=50, top_p=0.9)):
    fast, slow = generate(model, prompts, 16, sampling=s, seed=3), generate_reference(model, prompts, 16, sampling=s, seed=3)
    print(f'{str(s):52} identical: {fast == slow}')
    test_eq(fast, slow)

# %% [markdown]
# A prompt's continuation does not depend on what else is in the batch (padding is invisible), and a
# stop token ends a row while the others go on:

# %%
alone = [generate(model, [p], 12).tokens[0] for p in prompts]
test_eq(alone, g.tokens)
# pretend that a token which first appears mid-row is an end-of-sequence token
r, j = next((r, j) for r, row in enumerate(g.tokens) for j in range(1, len(row)) if row[j] not in row[:j])
stop = g.tokens[r][j]
gs = generate(model, prompts, 12, stop_tokens=[stop])
gs

# %%
test_eq(gs.tokens[r], g.tokens[r][:j])
test_eq(gs.stop_tokens[r], stop)
for row, full in zip(gs.tokens, g.tokens): test_eq(row, full[:len(row)])

# %% [markdown]
# Chunked prefill against one pass, on prompts of several lengths (one longer than the chunk by less than a chunk,
# one an exact multiple), greedy and sampled, and both against the same weights with the reference attention
# everywhere (`attention_impl='xla'`):

# %%
reference = model_with_params(cfg.replace(attention_impl='xla'), params_of(model))
long_prompts = [list(range(3, 203)), list(range(40, 97)), [11] * 128]
for sampling in (Sampling(), Sampling(temperature=0.9, top_p=0.9)):
    one_pass = generate(model, long_prompts, 10, sampling=sampling, seed=3, prefill_chunk=4096)
    chunked = generate(model, long_prompts, 10, sampling=sampling, seed=3, prefill_chunk=64)
    plain = generate(reference, long_prompts, 10, sampling=sampling, seed=3, prefill_chunk=64)
    test_eq(chunked.tokens, one_pass.tokens)
    test_eq(plain.tokens, one_pass.tokens)
print('chunks of 64, one pass and the reference attention agree:', chunked.tokens[0])

# %% [markdown]
# and the memory a 32K-token prompt needs, from the compiled program (`memory_analysis`, nothing is run): the tiny
# model with `max_seq_len` raised to 32K, one row, prefill plus one new token.

# %%
#| export
def prefill_memory_gib(model: Decoder, length: int, prefill_chunk: int = 1024) -> float:
    "Scratch memory (GiB) of `generate` for one `length`-token prompt and one new token, from the compiled program."
    gd, st = nnx.split(model)
    args = [jax.ShapeDtypeStruct((1, length), jnp.int32)] * 3
    lowered = _decode.lower(gd, st, *args, jax.random.key(0), jnp.float32(0), jnp.int32(0), jnp.float32(1),
                            jnp.asarray([-2], jnp.int32), 1, prefill_chunk)
    return lowered.compile().memory_analysis().temp_size_in_bytes / 2**30

# %%
def prefill_gib(L, chunk, impl='auto'):
    return prefill_memory_gib(Decoder(get_preset('tiny', max_seq_len=L + 16, attention_impl=impl), rngs=nnx.Rngs(0)), L, chunk)
runs = {'reference attention, one pass': ('xla', None), 'blockwise, one pass': ('auto', None),
        'blockwise, chunks of 1024': ('auto', 1024)}
mem = {(name, L): prefill_gib(L, chunk or L, impl) for L in (8192, 32768) for name, (impl, chunk) in runs.items()}
for (name, L), g in mem.items(): print(f'{L:>6} tokens, {name:>30}: {g:6.3f} GiB')

# %%
ref, one, chunked = ((mem[(n, 8192)], mem[(n, 32768)]) for n in runs)
assert chunked[1] < 1.0 and ref[1] > 100 * chunked[1]      # the target: at most 1 GiB at 32K tokens
for short, long in (one, chunked): assert long < 5 * short  # 4x the length, at most ~4x the memory: linear
assert ref[1] > 12 * ref[0]                                 # the reference's [prompt, prompt] scores: quadratic

# %% [markdown]
# ## Speed
#
# The first call compiles; later calls with the same shapes reuse the program. On this CPU:

# %%
batch = [list(range(1, 33))] * 8
generate(model, batch, 64)                       # compile
t0 = time.perf_counter(); r = generate(model, batch, 64); dt = time.perf_counter() - t0
print(f'{8 * 64 / dt:,.0f} tokens/s (batch 8, 64 new tokens each, {dt * 1e3:.0f} ms)')

# %%
test_eq([len(t) for t in r.tokens], [64] * 8)

# %% [markdown]
# ## Bad input

# %%
test_fail(lambda: generate(model, [[1, 2, cfg.vocab_size]]), contains='out of range')
test_fail(lambda: generate(model, [[]]), contains='non-empty')
test_fail(lambda: generate(model, []), contains='non-empty')
test_fail(lambda: generate(model, [[1.5, 2.0]]), contains='int token ids')
test_fail(lambda: generate(model, [[1] * 500], max_new_tokens=20), contains='max_seq_len')
test_fail(lambda: generate(model, [[1]], max_new_tokens=0), contains='max_new_tokens')
test_fail(lambda: generate(model, [[1]], stop_tokens=[cfg.vocab_size]), contains='out of range')
test_fail(lambda: generate(model, [[1]], prefill_chunk=0), contains='prefill_chunk')

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
