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
# # Model
#
# > The Llama-style decoder in Flax NNX: scanned layers, remat, a KV cache, parameter counts in closed form.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/12_model.ipynb)

# %%
#| default_exp model

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

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xgen_small.attention import BlockSizes, attention, blockwise_forward
from xgen_small.config import ModelConfig
from xgen_small.layers import MLP, RMSNorm, Rope, constrain, dense, logical_param

# %%
from fastcore.test import test_eq, test_close, test_fail

# Tolerance of a numerical equivalence: float32 rounding on a CPU; on TPUs and GPUs float32 matmuls run at a lower
# default precision (bfloat16 passes, TF32) and the model's 'auto' compute dtype is bfloat16, so about 3 digits.
tol = lambda eps: eps if jax.default_backend() == 'cpu' else max(eps, 3e-2)
import time
from xgen_small.config import get_preset, num_params


# %% [markdown]
# ## The KV cache is data, not module state
#
# Autoregressive decoding reuses the keys and values of every token already seen. We keep them in
# an explicit pytree that the forward pass takes and returns, rather than hiding them inside the
# module: a jitted decode loop can then carry the cache through `jax.lax.while_loop`, and nothing
# about training changes when a cache exists somewhere.
#
# The cache stores keys/values for all layers at once (`[layers, batch, kv_heads, slots, head_dim]`,
# stacked like the layer weights, so the layer scan slices both together), plus the segment id and
# position of whatever sits in each slot. Heads come before slots so that each (sequence, head) pair
# is one contiguous `[slots, head_dim]` matrix: the attention matmuls then read the cache in place,
# where the `[slots, heads]` order would make XLA copy the whole cache into that layout at every step. An empty slot has segment id 0, so the attention mask of
# notebook 11 ignores it without any special case. With GQA the cache is `n_heads / n_kv_heads`
# times smaller than the queries would suggest.

# %%
#| export
class KVCache(NamedTuple):
    "Keys/values of every layer plus the segment id and position of each slot; `index` is the next slot to write."
    k: jax.Array            # [layers, batch, kv_heads, slots, head_dim]
    v: jax.Array
    segment_ids: jax.Array  # [batch, slots]; 0 marks an empty slot or padding
    positions: jax.Array    # [batch, slots]
    index: jax.Array        # int32 scalar

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, slots: int, dtype=None) -> KVCache:
        "An empty cache for `batch` sequences of up to `slots` tokens (at most `cfg.max_seq_len`)."
        if slots > cfg.max_seq_len:
            raise ValueError(f"a cache of {slots} slots exceeds the model's max_seq_len={cfg.max_seq_len}")
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, slots, cfg.head_dim)
        dtype = dtype or cfg.compute_jnp_dtype
        zeros = jnp.zeros((batch, slots), jnp.int32)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), zeros, zeros, jnp.zeros((), jnp.int32))

    @property
    def slots(self) -> int: return self.k.shape[3]


# %%
c = KVCache.create(get_preset('tiny'), batch=2, slots=64)
{name: getattr(c, name).shape for name in c._fields}, f'{c.k.nbytes * 2 / 2**20:.2f} MiB'

# %% [markdown]
# At 128K tokens the cache is what limits long-context serving: for the 9B shape in bfloat16,
# one sequence needs

# %%
cfg9 = get_preset('xgen_9b')
per_token = 2 * cfg9.n_layers * cfg9.n_kv_heads * cfg9.head_dim * 2  # k and v, bf16 bytes
print(f'{per_token / 2**10:.0f} KiB per token, {per_token * 131072 / 2**30:.1f} GiB per 128K-token sequence '
      f'(it would be {cfg9.q_per_kv}x that without GQA)')

# %%
test_eq(per_token, 147456)
test_fail(lambda: KVCache.create(get_preset('tiny'), 1, 4096), contains='max_seq_len')


# %% [markdown]
# ## Attention layer
#
# Projections are stored per head (`[embed, heads, head_dim]`) rather than flattened, so their
# logical axis names can say `q_heads` / `kv_heads`: tensor parallelism (if ever wanted) shards heads,
# FSDP shards `embed`. RoPE rotates queries and keys by their positions; with a cache the new keys
# are written at `index` first, then the queries attend over every slot. The attention itself goes
# through notebook 11's entry point with the configured implementation (`attention_impl`), except against a
# cache, where queries and keys differ in length and the causal mask comes from positions. A prefill chunk
# (many queries against every slot) goes through `blockwise_forward` by position, so only `[block, block]` tiles
# of scores exist and tiles of empty or future slots are skipped: memory grows linearly with the prompt. One new
# token's scores are `[1, slots]`, already linear, and the reference path computes them fastest. A model configured
# with `attention_impl='xla'` uses the reference path everywhere, cache included (the quadratic baseline).

# %%
#| export
class Attention(nnx.Module):
    "Grouped-query self-attention with rotary embeddings and an optional KV cache."
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, H, K, h, dt, std = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_jnp_dtype, cfg.init_std
        self.q = logical_param(rngs.params(), (d, H, h), ('embed', 'q_heads', 'head_dim'), dt, std=std)
        self.k = logical_param(rngs.params(), (d, K, h), ('embed', 'kv_heads', 'head_dim'), dt, std=std)
        self.v = logical_param(rngs.params(), (d, K, h), ('embed', 'kv_heads', 'head_dim'), dt, std=std)
        self.o = logical_param(rngs.params(), (H, h, d), ('q_heads', 'head_dim', 'embed'), dt, std=std)
        self.rope = Rope.from_config(cfg)
        self.impl = cfg.attention_impl
        self.blocks = BlockSizes(cfg.attn_block_q, cfg.attn_block_kv)
        self.compute_dtype = cfg.compute_jnp_dtype

    def __call__(self, x, positions, segment_ids, cache: KVCache | None = None, layer=None):
        "`x`: `[B, T, d]`. With a cache, this layer's keys/values are written at `cache.index` and the cache returned."
        dt = self.compute_dtype
        x = x.astype(dt)
        q, k, v = (dense(x, w[...].astype(dt)) for w in (self.q, self.k, self.v))    # [B, T, heads, head_dim]
        q, k = self.rope(q, positions), self.rope(k, positions)
        q = constrain(q, ('batch', 'length', 'q_heads', 'head_dim'))
        if cache is None:
            k_all, v_all, kv_segment_ids, kv_positions = k, v, segment_ids, positions
        else:   # write the new keys/values in place, then read this layer's slots as a [B, S, K, h] view
            ks, vs = (
                jax.lax.dynamic_update_slice(
                    c, new.transpose(0, 2, 1, 3)[None].astype(c.dtype), (layer, 0, 0, cache.index, 0)
                )
                for c, new in ((cache.k, k), (cache.v, v))
            )
            k_all, v_all = (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False).swapaxes(1, 2) for c in (ks, vs))
            cache, kv_segment_ids, kv_positions = cache._replace(k=ks, v=vs), cache.segment_ids, cache.positions
        args = (q, k_all.astype(dt), v_all.astype(dt), segment_ids, kv_segment_ids)
        if cache is None:
            out = attention(*args, positions, kv_positions, impl=self.impl, block_sizes=self.blocks)
        elif q.shape[1] > 1 and self.impl != 'xla':   # a prefill chunk: [block, block] tiles, causal by position
            out = blockwise_forward(*args, causal=True, block_sizes=self.blocks, scale=q.shape[-1] ** -0.5,
                                    q_pos=positions, kv_pos=kv_positions)[0]
        else:   # one new token: [1, slots] scores, small, and fastest by the reference path (or 'xla' asked for)
            out = attention(*args, positions, kv_positions, impl='xla')
        return dense(out, self.o[...].astype(dt), n_in=2), cache


# %% [markdown]
# ## Block and decoder
#
# A pre-norm residual block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#
# The decoder creates its `n_layers` blocks with `nnx.vmap`, which gives every weight a leading axis
# named `layers`; the forward pass then slices one layer's weights at a time inside `jax.lax.scan`
# (`scan_layers=True`) or a Python loop (`scan_layers=False`, handy for debugging one layer). Both
# read the same stacked parameters, so a checkpoint does not care which was used. Wrapping the scan
# body in `jax.checkpoint` (`remat`) keeps only each layer's input for the backward pass and
# recomputes the rest (`'full'`), or also keeps the matmul outputs (`'dots'`).
#
# Input checks happen here, at the model's door: a sequence longer than `max_seq_len` fails at trace
# time; out-of-range token ids fail at once when the ids are concrete, and inside `jit` (where ids
# are abstract) the embedding lookup returns NaN for them, so the loss turns NaN and the train loop
# stops loudly (notebook 18) instead of JAX's default of silently clamping the index.

# %%
#| export
class Block(nnx.Module):
    "Pre-norm Llama block: attention and SwiGLU MLP, each with a residual connection."
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = cfg.param_jnp_dtype
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=dt)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=dt)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids, cache: KVCache | None = None, layer=None):
        h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache, layer)
        x = x + h.astype(x.dtype)
        x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
        return constrain(x, ('batch', 'length', 'embed')), cache

_REMAT = {'full': jax.checkpoint_policies.nothing_saveable, 'dots': jax.checkpoint_policies.dots_saveable}

def check_tokens(tokens, vocab_size: int):
    "Raise if concrete `tokens` hold ids outside `[0, vocab_size)`; abstract (traced) tokens pass through."
    if isinstance(tokens, jax.core.Tracer): return
    t = np.asarray(tokens)
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        bad = t[(t < 0) | (t >= vocab_size)]
        raise ValueError(f"token ids out of range [0, {vocab_size}): found {bad[:5].tolist()} ({bad.size} in all)")

class Decoder(nnx.Module):
    "Llama-style decoder-only Transformer. Call it for logits; `forward` also threads a `KVCache`."
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.param_jnp_dtype
        self.embed = logical_param(
            rngs.params(), (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), dt, std=cfg.init_std
        )
        keys = jax.random.split(rngs.params(), cfg.n_layers)
        make = nnx.vmap(
            lambda key: Block(cfg, rngs=nnx.Rngs(params=key)), transform_metadata={nnx.PARTITION_NAME: 'layers'}
        )
        self.layers = make(keys)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=dt)
        self.lm_head = None if cfg.tie_embeddings else logical_param(
            rngs.params(), (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), dt, std=cfg.init_std)

    def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        "Float32 logits `[batch, length, vocab]` for int `tokens` `[batch, length]`."
        return self.forward(tokens, positions, segment_ids)[0]

    def forward(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None, last_only: bool = False):
        """Logits and the updated cache (None without one). Defaults: one segment; positions count on from
        `cache.index`. `last_only` computes logits for the last position alone (all a decoder's prefill needs; the
        vocabulary projection is a large share of a small model's work)."""
        cfg, dt = self.cfg, self.cfg.compute_jnp_dtype
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [batch, length], got {tokens.dtype}{list(tokens.shape)}")
        B, T = tokens.shape
        if T > cfg.max_seq_len: raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
        if cache is not None and T > cache.slots:
            raise ValueError(f"{T} tokens do not fit a cache of {cache.slots} slots")
        check_tokens(tokens, cfg.vocab_size)
        start = 0 if cache is None else cache.index
        if positions is None: positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None: segment_ids = jnp.ones((B, T), jnp.int32)

        x = jnp.take(self.embed[...], tokens, axis=0, mode='fill', fill_value=jnp.nan).astype(dt)
        x = constrain(x, ('batch', 'length', 'embed'))
        if cache is not None:   # record who now sits in the slots being written
            cache = cache._replace(
                segment_ids=jax.lax.dynamic_update_slice(
                    cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index)
                ),
                positions=jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, cache.index)),
            )

        graphdef, params = nnx.split(self.layers)
        def layer(carry, xs):   # the cache rides in the carry, so each layer updates it in place
            (x, cache), (p, i) = carry, xs
            return nnx.merge(graphdef, p)(x, positions, segment_ids, cache, i), None
        if cfg.remat != 'none': layer = jax.checkpoint(layer, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers: (x, cache), _ = jax.lax.scan(layer, (x, cache), (params, jnp.arange(cfg.n_layers)))
        else:
            for i in range(cfg.n_layers): (x, cache), _ = layer((x, cache), (jax.tree.map(lambda a: a[i], params), i))

        x = self.final_norm(x[:, -1:] if last_only else x)
        head = self.embed[...].astype(dt).T if cfg.tie_embeddings else self.lm_head[...].astype(dt)
        logits = dense(x, head, preferred_element_type=jnp.float32)
        logits = constrain(logits, ('batch', 'length', 'vocab'))
        if cache is not None: cache = cache._replace(index=cache.index + T)
        return logits, cache


# %% [markdown]
# The tiny preset, initialised and run on a batch:

# %%
cfg = get_preset('tiny')
model = Decoder(cfg, rngs=nnx.Rngs(0))
tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
logits = model(tokens)
logits.shape, logits.dtype

# %% [markdown]
# Every parameter carries logical axis names, with `layers` in front of the stacked block weights:

# %%
for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    print(f"{'.'.join(map(str, path)):28} {str(p.shape):22} {p.get_metadata()['out_sharding']}")

# %%
flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
test_eq(all(len(p.get_metadata()['out_sharding']) == p.ndim for _, p in flat), True)
test_eq(nnx.state(model, nnx.Param)['layers']['mlp']['gate'].get_metadata()['out_sharding'], ('layers', 'embed', 'mlp'))
test_eq(logits.shape, (2, 24, cfg.vocab_size))
# a fresh model predicts close to uniform: loss ~ log(vocab)
loss0 = float(-jnp.mean(jax.nn.log_softmax(logits)[0, jnp.arange(23), tokens[0, 1:]]))
test_close(loss0, math.log(cfg.vocab_size), eps=0.1)


# %% [markdown]
# ## Closed form = real tree
#
# `nnx.eval_shape` runs the constructor abstractly: we get every parameter's shape and dtype without
# allocating memory, so the 9B model is counted on a laptop. The count must equal the closed form of
# notebook 00 exactly.

# %%
#| export
def abstract_model(cfg: ModelConfig) -> Decoder:
    "A `Decoder` whose parameters are `jax.ShapeDtypeStruct`s: shapes and dtypes only, no memory."
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))

def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    "`[batch, length]` log-probability of each target token, in float32: what every scorer of a model's outputs reads."
    logits = logits.astype(jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]

def params_of(model: Decoder) -> dict:
    "The parameters of `model` as a pure dict of arrays (what checkpoints, `model_with_params` and optimizers take)."
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

def model_with_params(cfg: ModelConfig, params: dict) -> Decoder:
    "A `Decoder` of `cfg` holding `params` (a pure dict, as `params_of` returns), without initialising one first."
    shell = abstract_model(cfg)
    state = nnx.state(shell, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(nnx.graphdef(shell), state)

def count_params(model: Decoder) -> int:
    "Number of parameters in `model` (concrete or abstract)."
    return sum(math.prod(p.shape) for _, p in nnx.to_flat_state(nnx.state(model, nnx.Param)))


# %%
for name in ('tiny', 'xgen_4b', 'xgen_9b'):
    c = get_preset(name)
    t0 = time.perf_counter(); n = count_params(abstract_model(c)); dt_ = time.perf_counter() - t0
    print(f'{name:8} tree {n:>14,}   closed form {num_params(c):>14,}   ({n / 1e9:.2f}B, counted in {dt_:.2f}s)')
    test_eq(n, num_params(c))
test_eq(count_params(model), num_params(cfg))
test_eq(count_params(abstract_model(cfg.replace(tie_embeddings=True))), num_params(cfg.replace(tie_embeddings=True)))

# %%
_m = Decoder(get_preset('tiny'), rngs=nnx.Rngs(3))
_copy = model_with_params(_m.cfg, params_of(_m))
_x = jnp.arange(16)[None]
assert np.array_equal(np.asarray(_copy(_x)), np.asarray(_m(_x)))     # same weights, same function

# %% [markdown]
# ## Packed documents do not see each other
#
# Two documents packed in one row (segment ids 1 and 2, positions restarting at 0) must give exactly
# the logits each gives alone. This is the property that makes packing free.

# %%
a = jax.random.randint(jax.random.key(2), (1, 10), 0, cfg.vocab_size)
b = jax.random.randint(jax.random.key(3), (1, 14), 0, cfg.vocab_size)
packed = jnp.concatenate([a, b], axis=1)
seg = jnp.array([[1] * 10 + [2] * 14]); pos = jnp.array([list(range(10)) + list(range(14))])
out = model(packed, pos, seg)
err = max(float(jnp.max(jnp.abs(out[:, :10] - model(a)))), float(jnp.max(jnp.abs(out[:, 10:] - model(b)))))
err

# %%
test_close(err, 0.0, eps=tol(1e-5))


# %% [markdown]
# ## Scan, loop and remat compute the same function
#
# The three execution strategies must agree on both the loss and its gradient; only time and memory
# differ.

# %%
def loss_fn(m, tokens):
    logp = jax.nn.log_softmax(m(tokens[:, :-1]))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

variants = {'scan (default)': {}, 'python loop': dict(scan_layers=False), "remat='full'": dict(remat='full'),
            "remat='dots'": dict(remat='dots')}
results = {}
for name, change in variants.items():
    m = Decoder(cfg.replace(**change), rngs=nnx.Rngs(0))   # same seed: same weights as `model`
    results[name] = nnx.value_and_grad(loss_fn)(m, tokens)
    print(f'{name:16} loss {float(results[name][0]):.6f}')

# %%
ref_loss, ref_grads = results['scan (default)']
for name, (l, g) in results.items():
    test_close(l, ref_loss, eps=tol(1e-5))
    jax.tree.map(lambda x, y: test_close(x, y, eps=tol(1e-5)), nnx.state(g), nnx.state(ref_grads))

# %% [markdown]
# ## A KV cache gives the same logits as recomputation
#
# Feeding a sequence in pieces through the cache (a prefill of 16 tokens, then 8 single-token steps)
# must reproduce the logits of one full forward pass.

# %%
seq = jax.random.randint(jax.random.key(4), (2, 24), 0, cfg.vocab_size)
full = model(seq)
cache = KVCache.create(cfg, batch=2, slots=32)
pieces = []
logits_, cache = model.forward(seq[:, :16], cache=cache); pieces.append(logits_)
for t in range(16, 24):
    logits_, cache = model.forward(seq[:, t:t + 1], cache=cache); pieces.append(logits_)
incremental = jnp.concatenate(pieces, axis=1)
float(jnp.max(jnp.abs(incremental - full))), int(cache.index)

# %%
test_close(incremental, full, eps=tol(1e-4))
test_eq(int(cache.index), 24)

# %% [markdown]
# ## Bad input
#
# Each of these fails with a message that names the problem, instead of producing a wrong answer:

# %%
for bad in (lambda: model(jnp.array([[1, 2, cfg.vocab_size]])), lambda: model(jnp.array([[-1, 2]])),
            lambda: model(jnp.zeros((1, cfg.max_seq_len + 1), jnp.int32)), lambda: model(jnp.zeros((4,), jnp.int32)),
            lambda: model(jnp.zeros((1, 4), jnp.float32))):
    try: bad()
    except ValueError as e: print(type(e).__name__, '-', e)

# %%
test_fail(lambda: model(jnp.array([[1, 2, cfg.vocab_size]])), contains='out of range')
test_fail(lambda: model(jnp.zeros((1, cfg.max_seq_len + 1), jnp.int32)), contains='max_seq_len')
test_fail(lambda: model(jnp.zeros((4,), jnp.int32)), contains='[batch, length]')
# inside jit the ids are abstract: an out-of-range id poisons the logits with NaN instead of being clamped
jit_logits = nnx.jit(lambda m, t: m(t))(model, jnp.array([[1, 2, cfg.vocab_size + 5]]))
test_eq(bool(jnp.isnan(jit_logits[0, -1]).all()), True)

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
