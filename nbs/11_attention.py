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
# # Attention
#
# > Grouped-query attention with segment ids and positions: the reference XLA path that every faster kernel is checked against, and the `attention` entry point that picks an implementation.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/11_attention.ipynb)

# %%
#| default_exp attention

# %%
#| hide
# Colab only: install JAX for this runtime's accelerator (TPU, GPU or CPU), then xgen_small itself.
import os, subprocess, sys
if 'google.colab' in sys.modules:
    accel = 'tpu' if 'COLAB_TPU_ADDR' in os.environ or os.path.exists('/dev/accel0') else 'cuda12' if os.path.exists('/dev/nvidia0') else 'cpu'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', f'jax[{accel}]==0.10.2', 'fastcore==1.12.47',
                    'xgen_small @ git+https://github.com/xgen-small/xgen_small'], check=True)

# %%
#| export
from __future__ import annotations

import jax
import jax.numpy as jnp

# %%
from fastcore.test import test_eq, test_close, test_fail


# %% [markdown]
# ## Who may attend to whom
#
# Pre-training packs several documents into one fixed-length row, so that no compute is wasted on
# padding. Each token carries a **segment id** (which document it belongs to) and a **position**
# (its index *within* that document, which is what RoPE rotates by). Query $i$ may attend to key $j$
# iff both belong to the same segment and $j$ does not lie in $i$'s future:
#
# $$\text{mask}_{ij} = [\,s^q_i = s^k_j\,] \wedge [\,p^k_j \le p^q_i\,]$$
#
# Stating causality on positions rather than on row indices makes one rule serve three cases:
# packed training rows (positions restart at 0 in each document), left-padded prompts in a batch,
# and decoding against a KV cache, where the keys live in a buffer whose slots are not in step with
# the queries. Padding and empty cache slots get segment id 0, which no real token has.

# %%
#| export
def attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal: bool = True) -> jax.Array:
    "Boolean `[batch, q_len, kv_len]`: same segment and (if `causal`) key position <= query position."
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal: mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
    return mask


# %%
seg = jnp.array([[1, 1, 1, 2, 2, 0]])   # two packed documents and one pad
pos = jnp.array([[0, 1, 2, 0, 1, 0]])
attention_mask(seg, seg, pos, pos).astype(int)[0]

# %%
test_eq(attention_mask(seg, seg, pos, pos)[0].astype(int).tolist(),
        [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
         [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]])


# %% [markdown]
# ## Reference attention
#
# $\mathrm{softmax}(q k^\top / \sqrt{h} + \text{mask})\,v$, written out so that every step is visible.
# With **grouped-query attention** the $H$ query heads are split into $K$ groups of $G = H/K$, and
# each group reads one shared key/value head; reshaping queries to `[batch, K, G, length, h]` lets
# one einsum do it without copying keys $G$ times.
#
# Two numerical choices: logits and softmax are computed in float32 whatever the input dtype, and a
# query row that may see *no* key (possible with arbitrary segment ids) returns zeros instead of
# the NaN a naive softmax would give. We subtract the row maximum before exponentiating, the same
# identity that the blockwise and flash kernels (notebook 11, issue 5) apply one block at a time.
#
# This function materialises the full `[q_len, kv_len]` score matrix, so its memory grows
# quadratically with length. It is the ground truth, not the fast path.

# %%
#| export
def _check_qkv(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    if q.ndim != 4 or k.ndim != 4: raise ValueError(f"q and k must be [batch, length, heads, head_dim], got {q.shape} and {k.shape}")
    if k.shape != v.shape: raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    (B, T, H, D), (Bk, S, K, Dk) = q.shape, k.shape
    if B != Bk or D != Dk: raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if H % K: raise ValueError(f"{H} query heads are not a multiple of {K} key/value heads")
    for name, a, shape in (('q_segment_ids', q_segment_ids, (B, T)), ('kv_segment_ids', kv_segment_ids, (B, S)),
                           ('q_positions', q_positions, (B, T)), ('kv_positions', kv_positions, (B, S))):
        if a.shape != shape: raise ValueError(f"{name} must have shape {shape}, got {a.shape}")

def _defaults(q, k, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    (B, T), S = q.shape[:2], k.shape[1]
    if q_segment_ids is None: q_segment_ids = jnp.ones((B, T), jnp.int32)
    if kv_segment_ids is None: kv_segment_ids = q_segment_ids if S == T else jnp.ones((B, S), jnp.int32)
    if q_positions is None: q_positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32) + (S - T), (B, T))
    if kv_positions is None: kv_positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    return q_segment_ids, kv_segment_ids, q_positions, kv_positions

def attention_reference(q, k, v, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None, *,
                        causal: bool = True, scale: float | None = None) -> jax.Array:
    """Plain-XLA grouped-query attention. q: `[B, T, H, h]`; k, v: `[B, S, K, h]` with `H % K == 0`.
    Segment ids and positions are `[B, T]` / `[B, S]` int arrays (defaults: one segment, `0..len-1`, queries
    aligned to the end of the keys). Returns `[B, T, H, h]` in q's dtype."""
    q_segment_ids, kv_segment_ids, q_positions, kv_positions = _defaults(q, k, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    _check_qkv(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    (B, T, H, D), K = q.shape, k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    # heads-major layouts make every (batch, kv head) pair one contiguous matmul; a KV cache stored heads-major
    # (notebook 12) passes through these transposes for free, since XLA cancels a transpose of a transpose
    qg = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)            # [B, K, G, T, h]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)             # [B, K, S, h]
    logits = jnp.einsum('bkgtd,bksd->bkgts', qg, kt, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal)[:, None, None]
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)        # rows that see nothing
    p = jnp.exp(logits - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum('bkgts,bksd->bkgtd', p / jnp.where(denom == 0, 1.0, denom), vt.astype(jnp.float32))
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q.dtype)


# %% [markdown]
# Checked against `jax.nn.dot_product_attention` (JAX's own fused-attention API, which also handles
# GQA) on a causal, unpacked batch:

# %%
kq, kk, kv = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(kq, (2, 16, 8, 32)); k = jax.random.normal(kk, (2, 16, 2, 32)); v = jax.random.normal(kv, (2, 16, 2, 32))
ours = attention_reference(q, k, v)
theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True)
float(jnp.max(jnp.abs(ours - theirs)))

# %%
test_close(ours, theirs, eps=1e-5)
test_eq(ours.shape, (2, 16, 8, 32))

# %% [markdown]
# The property packing relies on: two documents packed into one row produce exactly the outputs
# they produce on their own.

# %%
seg = jnp.array([[1] * 10 + [2] * 6] * 2)
pos = jnp.array([list(range(10)) + list(range(6))] * 2)
packed = attention_reference(q, k, v, seg, seg, pos, pos)
alone_a = attention_reference(q[:, :10], k[:, :10], v[:, :10])
alone_b = attention_reference(q[:, 10:], k[:, 10:], v[:, 10:])
test_close(packed, jnp.concatenate([alone_a, alone_b], axis=1), eps=1e-5)

# %% [markdown]
# A row that may see nothing yields zeros, not NaN; bad shapes are refused with the offending name:

# %%
none_visible = attention_reference(q[:, :1], k, v, jnp.full((2, 1), 7), jnp.ones((2, 16), jnp.int32),
                                   jnp.zeros((2, 1), jnp.int32), None)
test_eq(bool(jnp.all(none_visible == 0)), True)
test_fail(lambda: attention_reference(q[:, :, :5], k, v), contains='not a multiple')
test_fail(lambda: attention_reference(q, k, v[:, :8]), contains='shapes differ')
test_fail(lambda: attention_reference(q, k, v, jnp.ones((2, 15), jnp.int32)), contains='q_segment_ids')

# %% [markdown]
# ## One entry point
#
# The model calls `attention(..., impl=...)` and never a kernel directly, so that the implementation
# is a config choice (`ModelConfig.attention_impl`). `'auto'` picks the best implementation
# available on the current platform. Today that is the reference path everywhere; the Pallas flash
# kernel, splash attention for TPU and the memory-linear blockwise path register themselves here as
# they land (issue 5). Asking for an implementation that does not exist names the ones that do.

# %%
#| export
IMPLEMENTATIONS: dict = {'xla': attention_reference}

def resolve_impl(impl: str = 'auto') -> str:
    "The implementation name that `impl` means on this platform."
    if impl == 'auto': return 'xla'
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; available: {', '.join(['auto', *sorted(IMPLEMENTATIONS)])}")
    return impl

def attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None, *,
              causal: bool = True, impl: str = 'auto') -> jax.Array:
    "Grouped-query attention through implementation `impl` (see `IMPLEMENTATIONS`); arguments as in `attention_reference`."
    return IMPLEMENTATIONS[resolve_impl(impl)](q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal=causal)


# %%
test_close(attention(q, k, v, impl='auto'), ours, eps=1e-7)
test_fail(lambda: attention(q, k, v, impl='cudnn'), contains='available: auto, xla')

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
