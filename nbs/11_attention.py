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
# > Grouped-query attention: the reference, online softmax, blockwise JAX, our Pallas kernel, splash, one entry.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/11_attention.ipynb)

# %%
#| default_exp attention

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

import jax
import jax.experimental.pallas as pl
import jax.numpy as jnp

# %%
from fastcore.test import test_eq, test_close, test_fail

# Tolerance of a numerical equivalence: float32 rounding on a CPU; on TPUs and GPUs float32 matmuls run at a lower
# default precision (bfloat16 passes, TF32) and the model's 'auto' compute dtype is bfloat16, so about 3 digits.
tol = lambda eps: eps if jax.default_backend() == 'cpu' else max(eps, 3e-2)


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
# identity that the blockwise and flash kernels below apply one block at a time.
#
# This function materialises the full `[q_len, kv_len]` score matrix, so its memory grows
# quadratically with length. It is the ground truth, not the fast path.

# %%
#| export
def _check_qkv(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be [batch, length, heads, head_dim], got {q.shape} and {k.shape}")
    if k.shape != v.shape: raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    (B, T, H, D), (Bk, S, K, Dk) = q.shape, k.shape
    if B != Bk or D != Dk: raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if H % K: raise ValueError(f"{H} query heads are not a multiple of {K} key/value heads")
    for name, a, shape in (('q_segment_ids', q_segment_ids, (B, T)), ('kv_segment_ids', kv_segment_ids, (B, S)),
                           ('q_positions', q_positions, (B, T)), ('kv_positions', kv_positions, (B, S))):
        if a.shape != shape: raise ValueError(f"{name} must have shape {shape}, got {a.shape}")

def attention_defaults(q, k, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    "The ids every implementation assumes when given None: one segment (id 1), positions `0..S-1`, queries at the end."
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
    q_segment_ids, kv_segment_ids, q_positions, kv_positions = attention_defaults(
        q, k, q_segment_ids, kv_segment_ids, q_positions, kv_positions
    )
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
test_close(ours, theirs, eps=tol(1e-5))
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
test_close(packed, jnp.concatenate([alone_a, alone_b], axis=1), eps=tol(1e-5))

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
# ## The online softmax: attention one block at a time
#
# The reference materialises the whole $T \times S$ score matrix: at 32K tokens, 4 GiB per head in
# float32. FlashAttention (Dao et al., 2022; FlashAttention-2, Dao, 2023) never does. It walks over
# the keys in blocks and keeps, for every query row, three running quantities: the largest score seen
# so far $m$, the softmax denominator $\ell = \sum_j e^{s_j - m}$, and the unnormalised output
# $a = \sum_j e^{s_j - m} v_j$. When a new block raises the maximum to $m'$, the old sums are rescaled
# by $e^{m - m'}$, which is exact:
#
# $$m' = \max(m, \max_j s_j), \qquad \ell' = e^{m - m'}\ell + \sum_j e^{s_j - m'}, \qquad a' = e^{m - m'}a + \sum_j e^{s_j - m'} v_j.$$
#
# After the last block the output is $a / \ell$, and the forward pass keeps one number per row for
# the backward pass, the log-sum-exp $L = m + \log \ell$. Memory is linear in length.
#
# The backward pass recomputes the probabilities block by block from $L$ instead of storing them:
# $P = e^{S - L}$. With $D_i = \sum_d dO_{id} O_{id}$ (one number per row), the gradients are
#
# $$dV = P^\top dO, \qquad dP = dO\, V^\top, \qquad dS = P \odot (dP - D), \qquad dQ = dS\, K \cdot \tau, \qquad dK = dS^\top Q \cdot \tau$$
#
# for the softmax scale $\tau = 1/\sqrt{h}$. Blocks that the mask empties entirely (future keys under
# causality) are skipped, which halves the work of causal attention.
#
# Two implementations of exactly this algorithm follow: a **blockwise** one in plain JAX, which runs
# on any backend (it is how long sequences train on a CPU), and a **Pallas kernel**, the same loops
# written for the accelerator's memory hierarchy. Both have a custom VJP with the backward above.
# Both take segment ids with the usual meaning (0 and up; attention only within a segment) and
# causal masking by index, which is position order in packed training data.

# %%
#| export
NEG = -1e30   # "minus infinity" that stays finite: exp(NEG - NEG) is 1, never NaN

@dataclass(frozen=True)
class BlockSizes:
    "Query and key/value block lengths of the forward pass and of the two backward passes."
    block_q: int = 128
    block_kv: int = 128
    block_q_bwd: int | None = None      # default: block_q
    block_kv_bwd: int | None = None     # default: block_kv

    def __post_init__(self):
        for n in ('block_q', 'block_kv', 'block_q_bwd', 'block_kv_bwd'):
            v = getattr(self, n)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"BlockSizes.{n} must be a positive int, got {v!r}")
    @property
    def bwd(self) -> tuple[int, int]: return self.block_q_bwd or self.block_q, self.block_kv_bwd or self.block_kv
    def fit(self, q_len: int, kv_len: int, pow2: bool = False) -> BlockSizes:
        """Blocks no longer than the sequences padded to a multiple of 8 (or, with `pow2`, to a power of two, which
        Triton needs), so short inputs do not pay for huge blocks."""
        cap = lambda b, n: min(b, 1 << max(3, (n - 1).bit_length()) if pow2 else -(-n // 8) * 8)
        qb, kb = self.bwd
        return BlockSizes(cap(self.block_q, q_len), cap(self.block_kv, kv_len), cap(qb, q_len), cap(kb, kv_len))

def _pad_to(x, axis: int, multiple: int, value):
    n = x.shape[axis]; extra = -n % multiple
    if not extra: return x
    widths = [(0, 0)] * x.ndim; widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)

def _heads_major(q, k, v, q_seg, kv_seg, bq: int, bk: int):
    """Pad lengths to the blocks (padding gets segment ids -1 / -2, which match nothing real) and move heads before
    length."""
    q = _pad_to(q, 1, bq, 0).transpose(0, 2, 1, 3); q_seg = _pad_to(q_seg.astype(jnp.int32), 1, bq, -1)
    k = _pad_to(k, 1, bk, 0).transpose(0, 2, 1, 3); v = _pad_to(v, 1, bk, 0).transpose(0, 2, 1, 3)
    kv_seg = _pad_to(kv_seg.astype(jnp.int32), 1, bk, -2)
    return q, k, v, q_seg, kv_seg

def online_softmax_init(shape, dtype=jnp.float32) -> tuple:
    "The empty running state `(a, m, l)` for queries whose output has `shape` `[..., q, D]`."
    return jnp.zeros(shape, dtype), jnp.full(shape[:-1], NEG, dtype), jnp.zeros(shape[:-1], dtype)

def online_softmax_step(carry: tuple, s, mask, v, pv) -> tuple:
    """Fold one block of keys into the running state `(a, m, l)`: scores `s [..., q, k]`, visibility `mask`
    (broadcastable to `s`), values `v`, and `pv(p, v) -> [..., q, D]` the probability-times-value product of this
    layout. The update is the one above; masked scores count as exactly zero probability."""
    a, m, l = carry
    s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    return a * alpha[..., None] + pv(p, v), m_new, l * alpha + p.sum(-1)

def online_softmax_result(carry: tuple) -> tuple:
    "`(output, log-sum-exp)` from the final state; rows that saw no key give output 0 and log-sum-exp `-NEG`."
    a, m, l = carry
    safe = jnp.where(l == 0, 1.0, l)
    return a / safe[..., None], jnp.where(l == 0, -NEG, m + jnp.log(safe))

def merge_partials(o1, l1, o2, l2) -> tuple:
    """Merge two partial softmaxes over disjoint sets of keys, each an output `[B, T, H, D]` and log-sum-exp
    `[B, H, T]`: lse = log(e^l1 + e^l2), o = e^(l1 - lse) o1 + e^(l2 - lse) o2. A row that saw no key in a part
    (log-sum-exp `-NEG`, as `online_softmax_result` leaves it) takes nothing from that part."""
    empty1, empty2 = l1 == -NEG, l2 == -NEG
    a, b = jnp.where(empty1, NEG, l1), jnp.where(empty2, NEG, l2)
    lse = jnp.logaddexp(a, b)
    w = lambda l: jnp.exp(l - lse).transpose(0, 2, 1)[..., None]
    return o1 * w(a) + o2 * w(b), jnp.where(empty1 & empty2, -NEG, lse)

def kv_blocks_seen(i, bq: int, bk: int, n_kv: int, causal: bool):
    "How many key blocks (of `bk`) query block `i` (of `bq`) needs: all `n_kv`, or up to the diagonal when causal."
    return jnp.minimum(((i + 1) * bq + bk - 1) // bk, n_kv) if causal else n_kv

def first_q_block_seeing(j, bq: int, bk: int, causal: bool):
    "The first query block (of `bq`) that sees key block `j` (of `bk`): 0, or the diagonal's block when causal."
    return (j * bk) // bq if causal else 0


# %% [markdown]
# Two such states over disjoint keys also combine after the fact: `merge_partials` weighs each part's output by its
# share of the total softmax mass, which is how sequence-parallel attention (notebook 14) joins chunks computed on
# different devices.
#
# Every implementation below (the blockwise loops, the Pallas kernel, and the ring of notebook 14) folds key blocks with
# `online_softmax_step` and decides how far causal loops run with `kv_blocks_seen` / `first_q_block_seeing`; only the
# layout (`pv`) differs. Folding the keys of one query row in three uneven blocks gives the softmax-weighted values:

# %%
s_row, v_row = jax.random.normal(jax.random.key(3), (1, 10)), jax.random.normal(jax.random.key(4), (10, 2))
pv_row = lambda p, v: p @ v
state = online_softmax_init((1, 2))
for lo, hi in ((0, 3), (3, 7), (7, 10)):
    state = online_softmax_step(state, s_row[:, lo:hi], jnp.ones((1, hi - lo), bool), v_row[lo:hi], pv_row)
out_row, lse_row = online_softmax_result(state)
print(out_row, jax.nn.softmax(s_row) @ v_row)

# %%
test_close(out_row, jax.nn.softmax(s_row) @ v_row, eps=1e-6)
test_close(lse_row, jax.nn.logsumexp(s_row, -1), eps=1e-6)
test_eq([int(kv_blocks_seen(i, 64, 32, 8, True)) for i in range(4)], [2, 4, 6, 8])   # up to the diagonal
test_eq([int(first_q_block_seeing(j, 64, 32, True)) for j in range(8)], [0, 0, 1, 1, 2, 2, 3, 3])
test_eq(int(kv_blocks_seen(0, 64, 32, 8, False)), 8)


# %% [markdown]
# ### Blockwise attention in plain JAX
#
# Queries are processed one block at a time (`jax.lax.map`), and for each, keys one block at a time
# (`jax.lax.fori_loop`, stopping at the diagonal when causal). Only a `[block_q, block_kv]` tile of
# scores exists at any moment, so memory is linear in length on every backend, including the CPU,
# where XLA has no fused attention.
#
# The two passes are public (`blockwise_forward`, `blockwise_backward`) because sequence parallelism (notebook 14)
# builds on them: a device there attends from its queries to keys that arrive in chunks, in any order. Given
# positions (`q_pos`, `kv_pos`), causality is read from them instead of from the index, every key block is visited,
# and a tile that no query of the block can see is skipped (`lax.cond`). The backward pass takes the output and
# log-sum-exp of the *whole* softmax, so a chunk's gradients come out right even though the chunk saw only part of
# the keys.

# %%
#| export
def _block_mask(q_seg, kv_seg, q0, k0, bq: int, bk: int, causal: bool, q_pos=None, kv_pos=None):
    """[..., bq, bk] visibility of a key block (starting at index k0) from a query block (starting at q0): same segment,
    and, when causal, key index <= query index, or key position <= query position when positions are given."""
    m = q_seg[..., :, None] == kv_seg[..., None, :]
    if causal and q_pos is not None: m &= q_pos[..., :, None] >= kv_pos[..., None, :]
    elif causal: m &= (q0 + jnp.arange(bq))[:, None] >= (k0 + jnp.arange(bk))[None, :]
    return m

def _skip_invisible(mask, step, carry):
    "Apply `step` to `carry` only if some key of the block is visible (positions give no index order to stop at)."
    return jax.lax.cond(jnp.any(mask), step, lambda c: c, carry)

def blockwise_forward(q, k, v, q_seg, kv_seg, *, causal: bool, block_sizes: BlockSizes, scale: float,
                      q_pos=None, kv_pos=None):
    """Blockwise attention's forward pass: `(out [B, T, H, D], lse [B, H, T])`, one `[block_q, block_kv]` tile of
    scores at a time. Without positions, causality is by index and the loops stop at the diagonal; with `q_pos` /
    `kv_pos` (any lengths, any order: a ring's chunks, a cache) it is by position, and invisible tiles are skipped."""
    (B, T, H, D), (S, K) = q.shape, k.shape[1:3]
    G, by_pos = H // K, q_pos is not None
    bs = block_sizes.fit(T, S); bq, bk = bs.block_q, bs.block_kv
    qh, kh, vh, qs, ks = _heads_major(q, k, v, q_seg, kv_seg, bq, bk)
    Tp, Sp = qh.shape[2], kh.shape[2]
    qh = qh.reshape(B, K, G, Tp // bq, bq, D).transpose(3, 0, 1, 2, 4, 5).astype(jnp.float32) * scale
    qs = qs.reshape(B, Tp // bq, bq).transpose(1, 0, 2)
    qp = _pad_to(q_pos, 1, bq, 0).reshape(B, Tp // bq, bq).transpose(1, 0, 2) if by_pos else qs
    kp = _pad_to(kv_pos, 1, bk, 0) if by_pos else ks
    kh, vh = kh.astype(jnp.float32), vh.astype(jnp.float32)

    pv = lambda p, vb: jnp.einsum('bkgqj,bkjd->bkgqd', p, vb)

    def one_q_block(args):
        i, qb, sb, pb = args                                 # qb [B, K, G, bq, D], sb / pb [B, bq]
        def body(j, carry):
            kb = jax.lax.dynamic_slice_in_dim(kh, j * bk, bk, axis=2)
            vb = jax.lax.dynamic_slice_in_dim(vh, j * bk, bk, axis=2)
            kvs = jax.lax.dynamic_slice_in_dim(ks, j * bk, bk, axis=1)
            kvp = jax.lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=1) if by_pos else None
            mask = _block_mask(sb, kvs, i * bq, j * bk, bq, bk, causal, pb if by_pos else None, kvp)
            def step(c):                                     # scores inside: a skipped tile costs no matmul
                return online_softmax_step(c, jnp.einsum('bkgqd,bkjd->bkgqj', qb, kb), mask[:, None, None], vb, pv)
            return _skip_invisible(mask, step, carry) if by_pos else step(carry)
        n = Sp // bk if by_pos else kv_blocks_seen(i, bq, bk, Sp // bk, causal)
        return online_softmax_result(jax.lax.fori_loop(0, n, body, online_softmax_init(qb.shape)))
    out, lse = jax.lax.map(one_q_block, (jnp.arange(Tp // bq), qh, qs, qp))  # [nq, B, K, G, bq, (D)]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(B, Tp, H, D)[:, :T].astype(q.dtype)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(B, H, Tp)[:, :, :T]
    return out, lse

def blockwise_backward(q, k, v, q_seg, kv_seg, out, lse, do, *, causal: bool, block_sizes: BlockSizes, scale: float,
                       q_pos=None, kv_pos=None):
    """Blockwise attention's backward pass, `(dq, dk, dv)`, from the forward's `out` and `lse` (which may cover more
    keys than `k`: a ring passes the *final* output and log-sum-exp, and each key chunk's gradients come out right).
    Causality as in `blockwise_forward`."""
    (B, T, H, D), (S, K) = q.shape, k.shape[1:3]
    G, by_pos = H // K, q_pos is not None
    bs = block_sizes.fit(T, S); bq, bk = bs.bwd
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1).transpose(0, 2, 1)   # [B, H, T]
    qh, kh, vh, qs, ks = _heads_major(q, k, v, q_seg, kv_seg, bq, bk)
    doh = _pad_to(do, 1, bq, 0).transpose(0, 2, 1, 3).astype(jnp.float32).reshape(B, K, G, -1, D)
    lse = _pad_to(lse, 2, bq, -NEG).reshape(B, K, G, -1); delta = _pad_to(delta, 2, bq, 0).reshape(B, K, G, -1)
    qh = qh.astype(jnp.float32).reshape(B, K, G, -1, D) * scale
    kh, vh = kh.astype(jnp.float32), vh.astype(jnp.float32)
    qp, kp = (_pad_to(q_pos, 1, bq, 0), _pad_to(kv_pos, 1, bk, 0)) if by_pos else (None, None)
    Tp, Sp = qh.shape[3], kh.shape[2]
    tile = lambda x, i, b, ax: jax.lax.dynamic_slice_in_dim(x, i * b, b, axis=ax)

    def visible(i, j):
        pos = (tile(qp, i, bq, 1), tile(kp, j, bk, 1)) if by_pos else (None, None)
        return _block_mask(tile(qs, i, bq, 1), tile(ks, j, bk, 1), i * bq, j * bk, bq, bk, causal, *pos)

    def probs(i, j, mask):
        qb, kb = tile(qh, i, bq, 3), tile(kh, j, bk, 2)
        s = jnp.einsum('bkgqd,bkjd->bkgqj', qb, kb)
        return qb, kb, jnp.where(mask[:, None, None], jnp.exp(s - tile(lse, i, bq, 3)[..., None]), 0.0)

    def dkv_block(j):
        def body(i, carry):
            mask = visible(i, j)
            def step(carry):
                dk, dv = carry
                qb, kb, p = probs(i, j, mask)
                dob = tile(doh, i, bq, 3)
                dv = dv + jnp.einsum('bkgqj,bkgqd->bkjd', p, dob)
                ds = p * (jnp.einsum('bkgqd,bkjd->bkgqj', dob, tile(vh, j, bk, 2)) - tile(delta, i, bq, 3)[..., None])
                return dk + jnp.einsum('bkgqj,bkgqd->bkjd', ds, qb), dv
            return _skip_invisible(mask, step, carry) if by_pos else step(carry)
        start = 0 if by_pos else first_q_block_seeing(j, bq, bk, causal)
        zeros = jnp.zeros((B, K, bk, D), jnp.float32)
        return jax.lax.fori_loop(start, Tp // bq, body, (zeros, zeros))

    def dq_block(i):
        def body(j, dq):
            mask = visible(i, j)
            def step(dq):
                qb, kb, p = probs(i, j, mask)
                ds = p * (
                    jnp.einsum('bkgqd,bkjd->bkgqj', tile(doh, i, bq, 3), tile(vh, j, bk, 2))
                    - tile(delta, i, bq, 3)[..., None]
                )
                return dq + jnp.einsum('bkgqj,bkjd->bkgqd', ds, kb)
            return _skip_invisible(mask, step, dq) if by_pos else step(dq)
        n = Sp // bk if by_pos else kv_blocks_seen(i, bq, bk, Sp // bk, causal)
        return jax.lax.fori_loop(0, n, body, jnp.zeros((B, K, G, bq, D), jnp.float32))

    dk, dv = jax.lax.map(dkv_block, jnp.arange(Sp // bk))                    # [nk, B, K, bk, D]
    dk = dk.transpose(1, 0, 3, 2, 4).reshape(B, Sp, K, D)[:, :S]
    dv = dv.transpose(1, 0, 3, 2, 4).reshape(B, Sp, K, D)[:, :S]
    dq = jax.lax.map(dq_block, jnp.arange(Tp // bq))                          # [nq, B, K, G, bq, D]
    dq = dq.transpose(1, 0, 4, 2, 3, 5).reshape(B, Tp, H, D)[:, :T] * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)      # dk: queries were pre-scaled

@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _blockwise(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, bs, scale):
    return blockwise_forward(q, k, v, q_seg, kv_seg, causal=causal, block_sizes=bs, scale=scale, q_pos=q_pos,
                             kv_pos=kv_pos)[0]

def _blockwise_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, bs, scale):
    out, lse = blockwise_forward(q, k, v, q_seg, kv_seg, causal=causal, block_sizes=bs, scale=scale, q_pos=q_pos,
                                 kv_pos=kv_pos)
    return out, (q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse)

def _blockwise_bwd(causal, bs, scale, res, do):
    q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse = res
    grads = blockwise_backward(q, k, v, q_seg, kv_seg, out, lse, do, causal=causal, block_sizes=bs, scale=scale,
                               q_pos=q_pos, kv_pos=kv_pos)
    return (*grads, None, None, None, None)

def blockwise_attention(q, k, v, q_seg, kv_seg, *, causal: bool = True, block_sizes: BlockSizes = BlockSizes(512, 512),
                        q_pos=None, kv_pos=None) -> jax.Array:
    """Differentiable blockwise attention (`blockwise_forward` with `blockwise_backward` as its VJP): causal by index,
    or by position when `q_pos` / `kv_pos` are given (then query and key lengths may differ)."""
    return _blockwise(q, k, v, q_seg, kv_seg, q_pos, kv_pos, causal, block_sizes, q.shape[-1] ** -0.5)

_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)

def _self_attention_args(q, k, v, q_segment_ids, kv_segment_ids, name: str):
    "Kernels implement self-attention (same query and key length, index-causal); refuse anything else clearly."
    _check_qkv(q, k, v, *attention_defaults(q, k, q_segment_ids, kv_segment_ids, None, None))
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"{name} attention computes self-attention: query length {q.shape[1]} != key length {k.shape[1]} "
            f"(use impl='xla' for decoding against a cache)"
        )
    return attention_defaults(q, k, q_segment_ids, kv_segment_ids, None, None)[:2]

def attention_blockwise(q, k, v, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None, *,
                        causal: bool = True, block_sizes: BlockSizes = BlockSizes(512, 512)) -> jax.Array:
    """Memory-linear self-attention in plain JAX (any backend), with a FlashAttention-style custom VJP.
    Causality is by index, which equals position order within the segments of packed data; positions are not read."""
    q_seg, kv_seg = _self_attention_args(q, k, v, q_segment_ids, kv_segment_ids, 'blockwise')
    return blockwise_attention(q, k, v, q_seg, kv_seg, causal=causal, block_sizes=block_sizes)


# %% [markdown]
# Checked against the reference, forward and gradients, on packed segments with GQA, and with block
# sizes that do not divide the length (the padding path):

# %%
def check(fn, T=96, H=4, K=2, D=16, causal=True, seed=0, eps=2e-5):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (2, T, H, D)); k = jax.random.normal(ks[1], (2, T, K, D)); v = jax.random.normal(ks[2], (2, T, K, D))
    seg = jnp.sort(jax.random.randint(ks[3], (2, T), 0, 3), axis=1)       # three packed documents per row
    pos = jnp.arange(T)[None] - jnp.argmax(seg[..., None] == seg[:, None, :], axis=-1)   # positions restart per segment
    ref = lambda q, k, v: attention_reference(q, k, v, seg, seg, pos, pos, causal=causal)
    out, ref_out = fn(q, k, v, seg, seg, causal=causal), ref(q, k, v)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * jnp.cos(jnp.arange(D)))
    g = jax.grad(loss(lambda q, k, v: fn(q, k, v, seg, seg, causal=causal)), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    errs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *g), (ref_out, *g_ref))]
    for e in errs: test_close(e, 0.0, eps=tol(eps))
    return errs

for bs in (BlockSizes(32, 32), BlockSizes(16, 64), BlockSizes(40, 24, 8, 56)):
    for causal in (True, False):
        print(f'{bs} causal={causal}: max |error| out, dq, dk, dv =',
              [f'{e:.1e}' for e in check(partial(attention_blockwise, block_sizes=bs), causal=causal)])

# %% [markdown]
# By position: the keys shuffled (a ring delivers them out of order) and attended in two halves, the halves merged by
# their log-sum-exps, against the reference on the keys in order:

# %%
def shuffled_halves_error(T=64, H=4, K=2, D=16):
    kq = jax.random.split(jax.random.key(7), 3)
    q, k, v = (jax.random.normal(kq[i], (1, T, n, D)) for i, n in enumerate((H, K, K)))
    seg, pos = jnp.ones((1, T), jnp.int32), jnp.arange(T)[None]
    perm = jax.random.permutation(jax.random.key(8), T)
    (o1, l1), (o2, l2) = [
        blockwise_forward(q, k[:, idx], v[:, idx], seg, seg[:, idx], causal=True, block_sizes=BlockSizes(16, 16),
                          scale=D ** -0.5, q_pos=pos, kv_pos=pos[:, idx]) for idx in (perm[:T // 2], perm[T // 2:])
    ]
    merged, _ = merge_partials(o1, l1, o2, l2)
    return float(jnp.max(jnp.abs(merged - attention_reference(q, k, v, seg, seg, pos, pos))))

print(f'shuffled keys in two halves, merged: max |error| {shuffled_halves_error():.1e}')
test_close(shuffled_halves_error(), 0.0, eps=tol(1e-5))


# %% [markdown]
# ### The Pallas kernel
#
# The same loops in Pallas. The grid is (batch, query head, query block); each program loads its query
# block and its segment ids, walks over its key/value head's blocks with `fori_loop`, stopping at the
# diagonal when causal, and writes its output block and log-sum-exp. Grouped-query attention costs
# nothing extra: the key/value `BlockSpec` maps query head `h` to key/value head `h // G`, so the
# kernel never copies keys per query head.
#
# The backward pass is two more kernels. One owns a key/value block and loops over query blocks (from
# the diagonal on), accumulating $dK$ and $dV$; the other owns a query block and accumulates $dQ$.
# $dK$ and $dV$ are produced per *query* head and summed over each group outside the kernel.
#
# Pallas compiles this to Triton on GPUs; on a CPU it runs in interpret mode (the kernel body executed
# as ordinary JAX ops), which is how the tests check it here. It stays within what Triton supports:
# power-of-two blocks of at least 16, matmuls via `jnp.dot` with float32 accumulation. (This notebook
# was last run on a CPU only: the kernel's Triton compilation and its speed against cuDNN are to be
# measured on a GPU; `benchmarks/attention.py` is the place for those numbers.)

# %%
#| export
def _flash_fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, scale, causal, bq, bk, n_kv):
    i = pl.program_id(2)
    q = q_ref[...].astype(jnp.float32) * scale                         # [bq, D]
    qs = qs_ref[...]
    pv = lambda p, vb: jnp.dot(p, vb, preferred_element_type=jnp.float32)
    def body(j, carry):
        kb = k_ref[pl.ds(j * bk, bk), :].astype(jnp.float32)
        vb = v_ref[pl.ds(j * bk, bk), :].astype(jnp.float32)
        mask = _block_mask(qs, ks_ref[pl.ds(j * bk, bk)], i * bq, j * bk, bq, bk, causal)
        return online_softmax_step(carry, jnp.dot(q, kb.T, preferred_element_type=jnp.float32), mask, vb, pv)
    n = kv_blocks_seen(i, bq, bk, n_kv, causal)
    out, lse = online_softmax_result(jax.lax.fori_loop(0, n, body, online_softmax_init(q.shape)))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse

def _flash_dkv_kernel(
    q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, d_ref, dk_ref, dv_ref, *, scale, causal, bq, bk, n_q
):
    j = pl.program_id(2)
    kb = k_ref[...].astype(jnp.float32); vb = v_ref[...].astype(jnp.float32); ks = ks_ref[...]
    def body(i, carry):
        dk, dv = carry
        q = q_ref[pl.ds(i * bq, bq), :].astype(jnp.float32) * scale
        do = do_ref[pl.ds(i * bq, bq), :].astype(jnp.float32)
        mask = _block_mask(qs_ref[pl.ds(i * bq, bq)], ks, i * bq, j * bk, bq, bk, causal)
        s = jnp.dot(q, kb.T, preferred_element_type=jnp.float32)
        p = jnp.where(mask, jnp.exp(s - lse_ref[pl.ds(i * bq, bq)][:, None]), 0.0)
        dv = dv + jnp.dot(p.T, do, preferred_element_type=jnp.float32)
        ds = p * (jnp.dot(do, vb.T, preferred_element_type=jnp.float32) - d_ref[pl.ds(i * bq, bq)][:, None])
        return dk + jnp.dot(ds.T, q, preferred_element_type=jnp.float32), dv
    start = first_q_block_seeing(j, bq, bk, causal)
    z = jnp.zeros(kb.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(start, n_q, body, (z, z))
    dk_ref[...] = dk.astype(dk_ref.dtype); dv_ref[...] = dv.astype(dv_ref.dtype)

def _flash_dq_kernel(
    q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, d_ref, dq_ref, *, scale, causal, bq, bk, n_kv
):
    i = pl.program_id(2)
    q = q_ref[...].astype(jnp.float32) * scale; do = do_ref[...].astype(jnp.float32)
    qs, lse, dl = qs_ref[...], lse_ref[...], d_ref[...]
    def body(j, dq):
        kb = k_ref[pl.ds(j * bk, bk), :].astype(jnp.float32)
        vb = v_ref[pl.ds(j * bk, bk), :].astype(jnp.float32)
        mask = _block_mask(qs, ks_ref[pl.ds(j * bk, bk)], i * bq, j * bk, bq, bk, causal)
        p = jnp.where(mask, jnp.exp(jnp.dot(q, kb.T, preferred_element_type=jnp.float32) - lse[:, None]), 0.0)
        ds = p * (jnp.dot(do, vb.T, preferred_element_type=jnp.float32) - dl[:, None])
        return dq + jnp.dot(ds, kb, preferred_element_type=jnp.float32)
    n = kv_blocks_seen(i, bq, bk, n_kv, causal)
    dq_ref[...] = (jax.lax.fori_loop(0, n, body, jnp.zeros(q.shape, jnp.float32)) * scale).astype(dq_ref.dtype)

def _specs(B, H, G, Tp, Sp, D, bq, bk, per: str):
    "BlockSpecs for heads-major arrays; `per` says whether a program owns a query block ('q') or a key block ('k')."
    full_q = pl.BlockSpec((None, None, Tp, D), lambda b, h, x: (b, h, 0, 0))
    full_kv = pl.BlockSpec((None, None, Sp, D), lambda b, h, x: (b, h // G, 0, 0))
    blk_q = pl.BlockSpec((None, None, bq, D), lambda b, h, x: (b, h, x, 0))
    blk_kv = pl.BlockSpec((None, None, bk, D), lambda b, h, x: (b, h // G, x, 0))
    qs_full, ks_full = (
        pl.BlockSpec((None, Tp), lambda b, h, x: (b, 0)),
        pl.BlockSpec((None, Sp), lambda b, h, x: (b, 0)),
    )
    qs_blk, ks_blk = pl.BlockSpec((None, bq), lambda b, h, x: (b, x)), pl.BlockSpec((None, bk), lambda b, h, x: (b, x))
    row_full, row_blk = (
        pl.BlockSpec((None, None, Tp), lambda b, h, x: (b, h, 0)),
        pl.BlockSpec((None, None, bq), lambda b, h, x: (b, h, x)),
    )
    if per == 'q': return dict(q=blk_q, kv=full_kv, qs=qs_blk, ks=ks_full, row=row_blk, out=blk_q)
    return dict(
        q=full_q,
        kv=blk_kv,
        qs=qs_full,
        ks=ks_blk,
        row=row_full,
        out=pl.BlockSpec((None, None, bk, D), lambda b, h, x: (b, h, x, 0)),
    )

def _gpu_params(interpret: bool):
    """Compiled on a GPU, the kernels ask for Triton by name. JAX 0.10's default Pallas GPU backend (Mosaic GPU) stages
    every block in shared memory, and these kernels read the whole key/value sequence as one block (looping over it in
    `block_kv` slices): Triton reads such a block straight from HBM, Mosaic GPU would need it all on chip."""
    if interpret: return None
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=4, num_stages=2)

def _per_platform(fn, **interpret_on):
    "Call `fn(interpret)` with the `interpret` each target platform needs, chosen when the program is lowered for it."
    return lambda *args: jax.lax.platform_dependent(*args, **{p: partial(fn, i) for p, i in interpret_on.items()})

def _fl_fwd(q, k, v, q_seg, kv_seg, causal, bs, scale, interpret):
    (B, T, H, D), K = q.shape, k.shape[2]
    bs = bs.fit(T, k.shape[1], pow2=not interpret); bq, bk = bs.block_q, bs.block_kv
    qh, kh, vh, qs, ks = _heads_major(q, k, v, q_seg, kv_seg, bq, bk)
    Tp, Sp = qh.shape[2], kh.shape[2]
    sp = _specs(B, H, H // K, Tp, Sp, D, bq, bk, 'q')
    out, lse = pl.pallas_call(
        partial(_flash_fwd_kernel, scale=scale, causal=causal, bq=bq, bk=bk, n_kv=Sp // bk),
        grid=(B, H, Tp // bq),
        in_specs=[sp['q'], sp['kv'], sp['kv'], sp['qs'], sp['ks']],
        out_specs=[sp['out'], sp['row']],
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, D), q.dtype), jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
        interpret=interpret,
        compiler_params=_gpu_params(interpret),
        name='xgen_flash_fwd',
    )(qh, kh, vh, qs, ks)
    return out[:, :, :T].transpose(0, 2, 1, 3), lse

def _fl_bwd(q, k, v, q_seg, kv_seg, out, lse, do, causal, bs, scale, interpret):
    (B, T, H, D), (S, K) = q.shape, k.shape[1:3]
    G = H // K
    bs = bs.fit(T, S, pow2=not interpret); bq, bk = bs.bwd
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1).transpose(0, 2, 1)
    qh, kh, vh, qs, ks = _heads_major(q, k, v, q_seg, kv_seg, bq, bk)
    Tp, Sp = qh.shape[2], kh.shape[2]
    doh = _pad_to(do, 1, bq, 0).transpose(0, 2, 1, 3)
    lse = _pad_to(lse[:, :, :T], 2, bq, -NEG); delta = _pad_to(delta, 2, bq, 0)
    kw = dict(scale=scale, causal=causal, bq=bq, bk=bk)
    sk = _specs(B, H, G, Tp, Sp, D, bq, bk, 'k')
    dk, dv = pl.pallas_call(
        partial(_flash_dkv_kernel, n_q=Tp // bq, **kw),
        grid=(B, H, Sp // bk),
        in_specs=[sk['q'], sk['kv'], sk['kv'], sk['qs'], sk['ks'], sk['q'], sk['row'], sk['row']],
        out_specs=[sk['out'], sk['out']],
        out_shape=[jax.ShapeDtypeStruct((B, H, Sp, D), jnp.float32)] * 2,
        interpret=interpret,
        compiler_params=_gpu_params(interpret),
        name='xgen_flash_dkv',
    )(qh, kh, vh, qs, ks, doh, lse, delta)
    sq = _specs(B, H, G, Tp, Sp, D, bq, bk, 'q')
    dq = pl.pallas_call(
        partial(_flash_dq_kernel, n_kv=Sp // bk, **kw),
        grid=(B, H, Tp // bq),
        in_specs=[sq['q'], sq['kv'], sq['kv'], sq['qs'], sq['ks'], sq['q'], sq['row'], sq['row']],
        out_specs=sq['out'],
        out_shape=jax.ShapeDtypeStruct((B, H, Tp, D), q.dtype),
        interpret=interpret,
        compiler_params=_gpu_params(interpret),
        name='xgen_flash_dq',
    )(qh, kh, vh, qs, ks, doh, lse, delta)
    # per query head -> per KV head
    group_sum = lambda x: x[:, :, :S].reshape(B, K, G, S, D).sum(2).transpose(0, 2, 1, 3)
    return dq[:, :, :T].transpose(0, 2, 1, 3), group_sum(dk).astype(k.dtype), group_sum(dv).astype(v.dtype)


# %% [markdown]
# ### The same kernels for TPUs
#
# Mosaic, the TPU compiler for Pallas, sees memory differently from Triton. A TPU core computes on `[8, 128]` tiles
# (8 sublanes by 128 lanes), every block a kernel reads is copied into on-chip VMEM by a pipeline that prefetches
# the next grid step's blocks, and a block's last two dimensions must be multiples of 8 and 128 (or the whole
# array's). So the TPU kernels differ in layout, not in algorithm:
#
# - **Keys are a grid axis.** The grid is (batch, head, query block, key block); VMEM scratch holds the running
#   `(acc, m, l)` across the key axis, which is marked `arbitrary` (sequential) while the others are `parallel`.
#   `pl.when` initialises the state at the first key block, skips blocks past the causal diagonal, and writes the
#   output at the last. The index maps repeat the last block a query block needs, so skipped steps fetch nothing.
# - **Per-row statistics are lane-replicated**: `m`, `l`, the log-sum-exp and the backward's `delta` are
#   `[rows, 128]` with the same value in every lane, so that they are tiles and broadcast against `[rows, block_kv]`
#   scores by tiling lanes. Query segment ids are replicated over lanes, key segment ids over 8 sublanes, for the
#   same reason.
# - **Blocks are multiples of 128** and sequences are padded to them (padding gets segment ids that match nothing).
#
# The backward pass keeps the two-kernel split: one owns a key block and steps over query blocks (dK, dV), the other
# owns a query block (dQ). On this CPU the TPU kernels run in interpret mode (`kernel='tpu', interpret=True`); for a
# TPU they lower through Mosaic, which `tests/test_lowering.py` checks without one.

# %%
#| export
LANES, SUBLANES = 128, 8   # a TPU vector register: 8 sublanes x 128 lanes

def _lanes(x, n: int):
    "A lane-replicated `[rows, 128]` statistic as `[rows, n]` (n a multiple of 128, or at most 128)."
    return jnp.tile(x, (1, n // LANES)) if n >= LANES else x[:, :n]

def _tpu_visible(qi, kj, bq: int, bk: int):
    "Whether query block `qi` sees any key of block `kj` under index causality."
    return kj * bk <= qi * bq + bq - 1

def _tpu_mask(qs_ref, ks_ref, qi, kj, bq: int, bk: int, causal: bool):
    "[bq, bk] visibility from lane-replicated query segment ids and sublane-replicated key segment ids."
    m = _lanes(qs_ref[...], bk) == ks_ref[:1, :]
    if causal:
        rows = jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0) + qi * bq
        m &= jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1) + kj * bk <= rows
    return m

def _tpu_fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, acc, m_sc, l_sc, *, scale, causal, bq, bk):
    i, j, D = pl.program_id(2), pl.program_id(3), acc.shape[-1]

    @pl.when(j == 0)
    def _():
        acc[...] = jnp.zeros_like(acc); m_sc[...] = jnp.full_like(m_sc, NEG); l_sc[...] = jnp.zeros_like(l_sc)

    @pl.when(_tpu_visible(i, j, bq, bk) if causal else j >= 0)
    def _():
        s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        mask = _tpu_mask(qs_ref, ks_ref, i, j, bq, bk, causal)
        s = jnp.where(mask, s * scale, NEG)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])                # [bq, 128]
        p = jnp.where(mask, jnp.exp(s - _lanes(m_new, bk)), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1)[:, None]
        m_sc[...] = m_new
        pv = jax.lax.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc[...] = acc[...] * _lanes(alpha, D) + pv

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        l = l_sc[...]
        safe = jnp.where(l == 0, 1.0, l)
        o_ref[...] = (acc[...] / _lanes(safe, D)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(l == 0, -NEG, m_sc[...] + jnp.log(safe))

def _tpu_probs(q_ref, k_ref, qs_ref, ks_ref, lse_ref, qi, kj, *, scale, causal, bq, bk):
    s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    mask = _tpu_mask(qs_ref, ks_ref, qi, kj, bq, bk, causal)
    return jnp.where(mask, jnp.exp(s * scale - _lanes(lse_ref[...], bk)), 0.0)

def _tpu_dkv_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, d_ref, dk_ref, dv_ref, dk_sc, dv_sc, *,
                    scale, causal, bq, bk):
    j, i = pl.program_id(2), pl.program_id(3)             # this program's key block; the query block of this step

    @pl.when(i == 0)
    def _():
        dk_sc[...] = jnp.zeros_like(dk_sc); dv_sc[...] = jnp.zeros_like(dv_sc)

    @pl.when(_tpu_visible(i, j, bq, bk) if causal else i >= 0)
    def _():
        p = _tpu_probs(q_ref, k_ref, qs_ref, ks_ref, lse_ref, i, j, scale=scale, causal=causal, bq=bq, bk=bk)
        do = do_ref[...]
        dv_sc[...] += jax.lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - _lanes(d_ref[...], bk))
        dk_sc[...] += jax.lax.dot(ds.T.astype(q_ref.dtype), q_ref[...], preferred_element_type=jnp.float32) * scale

    @pl.when(i == pl.num_programs(3) - 1)
    def _():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype); dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)

def _tpu_dq_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, d_ref, dq_ref, dq_sc, *,
                   scale, causal, bq, bk):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _(): dq_sc[...] = jnp.zeros_like(dq_sc)

    @pl.when(_tpu_visible(i, j, bq, bk) if causal else j >= 0)
    def _():
        p = _tpu_probs(q_ref, k_ref, qs_ref, ks_ref, lse_ref, i, j, scale=scale, causal=causal, bq=bq, bk=bk)
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - _lanes(d_ref[...], bk))
        dq_sc[...] += jax.lax.dot(ds.astype(k_ref.dtype), k_ref[...], preferred_element_type=jnp.float32) * scale

    @pl.when(j == pl.num_programs(3) - 1)
    def _(): dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)

def _tpu_specs(G: int, D: int, bq: int, bk: int, causal: bool, per: str):
    """BlockSpecs over a grid (batch, head, own block, step block): `per='q'` owns a query block and steps over key
    blocks, `per='k'` the reverse. Past the causal diagonal the index maps repeat the last block needed, so the
    pipeline fetches nothing new for steps that `pl.when` skips. (`lax.div`, not `//`: the indices are never
    negative, and Python's floor division lowers through a sign op that Mosaic resolves per TPU generation.)"""
    if per == 'q':
        qi = lambda i, j: i
        kj = (lambda i, j: jnp.minimum(j, jax.lax.div(i * bq + bq - 1, bk))) if causal else (lambda i, j: j)
    else:
        kj = lambda j, i: j
        qi = (lambda j, i: jnp.maximum(i, jax.lax.div(j * bk, bq))) if causal else (lambda j, i: i)
    return dict(
        q=pl.BlockSpec((None, None, bq, D), lambda b, h, x, y: (b, h, qi(x, y), 0)),
        kv=pl.BlockSpec((None, None, bk, D), lambda b, h, x, y: (b, jax.lax.div(h, G), kj(x, y), 0)),
        qs=pl.BlockSpec((None, bq, LANES), lambda b, h, x, y: (b, qi(x, y), 0)),
        ks=pl.BlockSpec((None, SUBLANES, bk), lambda b, h, x, y: (b, 0, kj(x, y))),
        row=pl.BlockSpec((None, None, bq, LANES), lambda b, h, x, y: (b, h, qi(x, y), 0)),
        dkv=pl.BlockSpec((None, None, bk, D), lambda b, h, x, y: (b, h, kj(x, y), 0)),
    )

def _tpu_layout(q, k, v, q_seg, kv_seg, bq: int, bk: int):
    "Heads-major, padded arrays plus segment ids replicated over lanes (queries) and sublanes (keys), as Mosaic tiles."
    qh, kh, vh, qs, ks = _heads_major(q, k, v, q_seg, kv_seg, bq, bk)
    return qh, kh, vh, jnp.repeat(qs[:, :, None], LANES, 2), jnp.repeat(ks[:, None, :], SUBLANES, 1)

def _tpu_blocks(bs: BlockSizes, T: int, backward: bool = False) -> tuple[int, int, int]:
    """`(block_q, block_kv, padding)` of the forward (or backward) pass: multiples of 128 (the lane width), no longer
    than the padded sequence, and one padding both divide (both blocks become the larger when it does not)."""
    cap = lambda b: max(LANES, min(-(-b // LANES) * LANES, -(-T // LANES) * LANES))
    bq, bk = (cap(b) for b in (bs.bwd if backward else (bs.block_q, bs.block_kv)))
    b = max(bq, bk)
    return (bq, bk, b) if b % bq == 0 and b % bk == 0 else (b, b, b)

def _tpu_params(interpret: bool, n_parallel: int = 3):
    if interpret: return None
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=('parallel',) * n_parallel + ('arbitrary',))

def _tpu_fwd(q, k, v, q_seg, kv_seg, causal, bs, scale, interpret):
    from jax.experimental.pallas import tpu as pltpu
    (B, T, H, D), K = q.shape, k.shape[2]
    bq, bk, b = _tpu_blocks(bs, T)
    qh, kh, vh, qs, ks = _tpu_layout(q, k, v, q_seg, kv_seg, b, b)       # one padding both block sizes divide
    Tp = qh.shape[2]
    sp = _tpu_specs(H // K, D, bq, bk, causal, 'q')
    out, lse = pl.pallas_call(
        partial(_tpu_fwd_kernel, scale=scale, causal=causal, bq=bq, bk=bk),
        grid=(B, H, Tp // bq, Tp // bk),
        in_specs=[sp['q'], sp['kv'], sp['kv'], sp['qs'], sp['ks']],
        out_specs=[sp['q'], sp['row']],
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, D), q.dtype), jax.ShapeDtypeStruct((B, H, Tp, LANES), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, LANES), jnp.float32)],
        interpret=interpret,
        compiler_params=_tpu_params(interpret),
        name='xgen_flash_tpu_fwd',
    )(qh, kh, vh, qs, ks)
    return out[:, :, :T].transpose(0, 2, 1, 3), lse[..., 0][:, :, :T]

def _tpu_bwd(q, k, v, q_seg, kv_seg, out, lse, do, causal, bs, scale, interpret):
    from jax.experimental.pallas import tpu as pltpu
    (B, T, H, D), (S, K) = q.shape, k.shape[1:3]
    G = H // K
    bq, bk, b = _tpu_blocks(bs, T, backward=True)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1).transpose(0, 2, 1)
    qh, kh, vh, qs, ks = _tpu_layout(q, k, v, q_seg, kv_seg, b, b)
    Tp = qh.shape[2]
    doh = _pad_to(do, 1, b, 0).transpose(0, 2, 1, 3)
    rows = lambda x, pad: jnp.repeat(_pad_to(x, 2, b, pad)[..., None], LANES, 3)   # [B, H, Tp, 128]
    lse, delta = rows(lse, -NEG), rows(delta, 0)
    kw = dict(scale=scale, causal=causal, bq=bq, bk=bk)
    sk = _tpu_specs(G, D, bq, bk, causal, 'k')
    dk, dv = pl.pallas_call(
        partial(_tpu_dkv_kernel, **kw),
        grid=(B, H, Tp // bk, Tp // bq),
        in_specs=[sk['q'], sk['kv'], sk['kv'], sk['qs'], sk['ks'], sk['q'], sk['row'], sk['row']],
        out_specs=[sk['dkv'], sk['dkv']],
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, D), jnp.float32)] * 2,
        scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)],
        interpret=interpret,
        compiler_params=_tpu_params(interpret),
        name='xgen_flash_tpu_dkv',
    )(qh, kh, vh, qs, ks, doh, lse, delta)
    sq = _tpu_specs(G, D, bq, bk, causal, 'q')
    dq = pl.pallas_call(
        partial(_tpu_dq_kernel, **kw),
        grid=(B, H, Tp // bq, Tp // bk),
        in_specs=[sq['q'], sq['kv'], sq['kv'], sq['qs'], sq['ks'], sq['q'], sq['row'], sq['row']],
        out_specs=sq['q'],
        out_shape=jax.ShapeDtypeStruct((B, H, Tp, D), q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)],
        interpret=interpret,
        compiler_params=_tpu_params(interpret),
        name='xgen_flash_tpu_dq',
    )(qh, kh, vh, qs, ks, doh, lse, delta)
    group_sum = lambda x: x[:, :, :S].reshape(B, K, G, S, D).sum(2).transpose(0, 2, 1, 3)
    return dq[:, :, :T].transpose(0, 2, 1, 3), group_sum(dk).astype(k.dtype), group_sum(dv).astype(v.dtype)

_KERNELS = {'gpu': (_fl_fwd, _fl_bwd), 'tpu': (_tpu_fwd, _tpu_bwd)}

@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _flash(q, k, v, q_seg, kv_seg, causal, bs, scale, interpret, kernel):
    return _KERNELS[kernel][0](q, k, v, q_seg, kv_seg, causal, bs, scale, interpret)[0]

def _flash_vjp_fwd(q, k, v, q_seg, kv_seg, causal, bs, scale, interpret, kernel):
    out, lse = _KERNELS[kernel][0](q, k, v, q_seg, kv_seg, causal, bs, scale, interpret)
    return out, (q, k, v, q_seg, kv_seg, out, lse)

def _flash_vjp_bwd(causal, bs, scale, interpret, kernel, res, do):
    q, k, v, q_seg, kv_seg, out, lse = res
    return (*_KERNELS[kernel][1](q, k, v, q_seg, kv_seg, out, lse, do, causal, bs, scale, interpret), None, None)

_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)

def attention_flash(
    q,
    k,
    v,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
    *,
    causal: bool = True,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool | None = None,
    kernel: str | None = None,
) -> jax.Array:
    """Our Pallas FlashAttention (forward and backward kernels). Self-attention, index-causal, segment ids >= 0.
    `kernel`: 'gpu' (Triton's layout: a program loops over the keys) or 'tpu' (Mosaic's: keys are a grid axis); by
    default, the one for the platform the program is lowered for, 'gpu' on a CPU. `interpret` defaults likewise:
    True on CPU (the kernels run as plain JAX ops), False on GPU and TPU, so exporting for `cuda` or `tpu` from a CPU
    host lowers the real kernels."""
    q_seg, kv_seg = _self_attention_args(q, k, v, q_segment_ids, kv_segment_ids, 'flash')
    if kernel not in (None, *_KERNELS):
        raise ValueError(f"flash kernel must be one of {sorted(_KERNELS)}, not {kernel!r}")
    run = lambda kern, i, *a: _flash(*a, causal, block_sizes, q.shape[-1] ** -0.5, i, kern)
    args = (q, k, v, q_seg, kv_seg)
    if interpret is not None and kernel is not None: return run(kernel, interpret, *args)
    per = lambda kern, i: partial(run, kernel or kern, i if interpret is None else interpret)
    return jax.lax.platform_dependent(*args, cpu=per('gpu', True), cuda=per('gpu', False), rocm=per('gpu', False),
                                      tpu=per('tpu', False))


# %% [markdown]
# In interpret mode on this CPU, against the reference, over block sizes, GQA ratios and both masks
# (`tests/test_attention_kernels.py` sweeps many more shapes with hypothesis):

# %%
for bs, (H, K) in ((BlockSizes(16, 16), (4, 2)), (BlockSizes(32, 16), (4, 4)), (BlockSizes(16, 32), (6, 1))):
    for causal in (True, False):
        errs = check(partial(attention_flash, block_sizes=bs), T=80, H=H, K=K, causal=causal)
        print(f'block_q={bs.block_q} block_kv={bs.block_kv} heads {H}/{K} causal={causal}: max |error| out, dq, dk, dv =',
              [f'{e:.1e}' for e in errs])

# %% [markdown]
# The TPU kernels, also in interpret mode, at lengths that are and are not multiples of their 128-token blocks:

# %%
for bs, T, (H, K) in ((BlockSizes(128, 128), 96, (4, 2)), (BlockSizes(128, 256), 300, (4, 1)),
                      (BlockSizes(256, 128, 128, 256), 256, (4, 4))):
    for causal in (True, False):
        errs = check(partial(attention_flash, block_sizes=bs, kernel='tpu', interpret=True), T=T, H=H, K=K, causal=causal)
        print(f'TPU kernels, T={T} block_q={bs.block_q} block_kv={bs.block_kv} heads {H}/{K} causal={causal}: '
              f'max |error| out, dq, dk, dv =', [f'{e:.1e}' for e in errs])
test_fail(lambda: attention_flash(*[jnp.zeros((1, 8, 2, 8))] * 3, kernel='mosaic'), contains='must be one of')


# %% [markdown]
# ## Splash attention (TPU)
#
# On TPUs the report trains with *splash* attention, JAX's sparse FlashAttention kernel for Mosaic
# (`jax.experimental.pallas.ops.tpu.splash_attention`). It takes a static mask description
# (a causal `MultiHeadMask`), skips the blocks the mask empties, and takes segment ids. We wrap it:
# the kernel is built once per (length, heads, blocks) and cached, queries are pre-scaled (splash
# does not scale), and the batch dimension is `vmap`ped, since the kernel works on one sequence of
# `[heads, length, head_dim]`. On a CPU it runs in interpret mode, which is slow but lets the
# tests check it forward and backward against the reference.

# %%
#| export
def _splash_kernel(seq_len: int, n_heads: int, causal: bool, bs: BlockSizes, interpret: bool):
    # Built afresh in each trace, not cached: a cached kernel carries device arrays (its mask tables) from an earlier
    # trace,
    # which a later `jax.export` lifts into extra arguments and then refuses (found by tests/test_lowering.py).
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    mask = sm.CausalMask((seq_len, seq_len)) if causal else sm.FullMask((seq_len, seq_len))
    bq, bk = bs.block_q, bs.block_kv
    qb, kb = bs.bwd
    blocks = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=qb, block_kv_dkv=kb,
                           block_kv_dkv_compute=kb, block_q_dq=qb, block_kv_dq=kb)
    return sk.make_splash_mha(
        mask=sm.MultiHeadMask([mask] * n_heads), block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
    )

def attention_splash(
    q,
    k,
    v,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
    *,
    causal: bool = True,
    block_sizes: BlockSizes = BlockSizes(512, 512),
    interpret: bool | None = None,
) -> jax.Array:
    "JAX's TPU splash attention, vmapped over the batch; interpret mode off TPU. Blocks: multiples of 128 dividing "
    "the length."
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    q_seg, kv_seg = _self_attention_args(q, k, v, q_segment_ids, kv_segment_ids, 'splash')
    (B, T, H, D) = q.shape
    bs = block_sizes.fit(T, T)
    blocks = (bs.block_q, bs.block_kv, *bs.bwd)
    if any(b % 128 or T % b for b in blocks):
        raise ValueError(
            f"splash attention needs block sizes that are multiples of 128 and divide the length {T}; got {bs}"
        )
    def run(interpret, q, k, v, q_seg, kv_seg):
        kernel = _splash_kernel(T, H, causal, bs, interpret)
        one = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sk.SegmentIds(q=qs, kv=ks))
        return jax.vmap(one)((q * D ** -0.5).transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                             q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32))
    args = (q, k, v, q_seg, kv_seg)
    out = run(interpret, *args) if interpret is not None else _per_platform(run, cpu=True, tpu=False)(*args)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


# %%
errs = check(partial(attention_splash, block_sizes=BlockSizes(128, 128)), T=256, H=4, K=2, eps=5e-5)
print('splash (interpret): max |error| out, dq, dk, dv =', [f'{e:.1e}' for e in errs])

# %% [markdown]
# ## One entry point
#
# The model calls `attention(..., impl=...)` and never a kernel directly, so that the implementation
# is a config choice (`ModelConfig.attention_impl`):
#
# | impl | what | runs on |
# |---|---|---|
# | `xla` | the reference: full score matrix, quadratic memory | everywhere; also the only one that decodes against a KV cache |
# | `blockwise` | online softmax in plain JAX, custom VJP, linear memory | everywhere |
# | `flash` | our Pallas kernels | GPU (Triton, asked for by name), TPU (Mosaic; lowered, not yet run on a TPU), CPU (interpret mode, for testing) |
# | `splash` | JAX's TPU splash kernel | TPU (Mosaic), CPU (interpret mode, for testing) |
# | `seq_ring`, `seq_allgather` | sequence-parallel attention over a mesh's `sequence` axis (notebook 14, which registers them) | everywhere, inside `jax.set_mesh` |
# | `auto` | the best of these for the platform and length | |
#
# `auto` picks splash on TPU when the length is a multiple of 128 (splash's tiles; blockwise otherwise) and flash on
# GPU; on a CPU it picks the reference for short sequences
# (up to 512 tokens) and blockwise beyond: measured on this CPU (`benchmarks/attention.py`), a tiny-model
# training step at 1K tokens takes 0.25 s with blockwise attention against 0.77 s with the reference,
# because blockwise skips the masked half of causal attention, and the reference's memory explodes
# with length. Asking for an implementation the platform cannot run names the ones it can.
#
# The choice is made when the program is *lowered*, for the platform it is lowered for
# (`jax.lax.platform_dependent`), not from the machine that traces it: `jax.export(..., platforms=['tpu'])` on a
# laptop lowers splash (or blockwise) exactly as a TPU would run it, and exporting flash for `cuda` lowers the real
# Triton kernels, never their interpret-mode stand-ins. `tests/test_lowering.py` exports the xgen_4b training step for
# TPU and GPU at lengths that are and are not multiples of 128.
#
# What each accelerator's compiler demands of a kernel, and where this project stands:
#
# - **Triton (GPU)** wants every array a kernel touches to have a power-of-two size, so compiled (not interpreted) flash
#   pads short sequences to a power of two (`BlockSizes.fit(..., pow2=True)`). JAX 0.10 lowers Pallas for GPUs through
#   Mosaic GPU by default, which stages each block in about 227 KB of shared memory; our kernels read the whole key/value
#   sequence as one block and loop over it in `block_kv` slices, which Triton reads straight from HBM and Mosaic GPU
#   cannot hold, so the kernels name Triton (`_gpu_params`).
# - **Mosaic (TPU)** wants each block's last two dimensions divisible by 8 and 128 (or equal to the array's), and
#   holds every block in VMEM (16-128 MiB, by generation). The GPU layout breaks both rules: its per-row statistics
#   (`lse`, one value per query, a block of shape `[block_q]`) are not tiles, and its programs read the whole key
#   sequence. So `flash` has a second set of kernels for TPUs (above), the same algorithm laid out Mosaic's way.
#   `auto` still picks JAX's splash kernel on TPU (for lengths that are multiples of 128, blockwise attention for the
#   rest): our TPU kernels lower for TPU (`tests/test_lowering.py`, D 64 and 128, 2K-32K tokens) but have not been
#   compiled or run on one yet, and a kernel becomes a default only after it has.
#
# The table is open: `register_impl` adds an implementation with the platforms it runs on. This module holds only the
# single-device kernels; the sequence-parallel ones need a device mesh and live in their own module
# (`xgen_small.seqpar`, notebook 14), which registers `seq_ring` and `seq_allgather` when imported (the training loop imports
# it), so the dependency runs one way: mesh code uses these kernels, never the reverse.

# %%
#| export
_ALL = {'cpu', 'gpu', 'tpu'}
IMPLEMENTATIONS: dict = {'xla': attention_reference, 'blockwise': attention_blockwise, 'flash': attention_flash,
                         'splash': attention_splash}
PLATFORMS = {'xla': _ALL, 'blockwise': _ALL, 'flash': _ALL, 'splash': {'cpu', 'tpu'}}

def register_impl(name: str, fn, platforms=_ALL):
    "Make `fn` (called like `attention_reference`, plus `block_sizes=` when given) available as `impl=name`."
    if name == 'auto': raise ValueError("'auto' is not an implementation name")
    IMPLEMENTATIONS[name], PLATFORMS[name] = fn, set(platforms)

_PLATFORM_KEYS = {'cpu': ('cpu',), 'gpu': ('cuda', 'rocm'), 'tpu': ('tpu',)}     # JAX's backends -> lowering platforms

def resolve_impl(impl: str = 'auto', seq_len: int | None = None, platform: str | None = None) -> str:
    "The implementation that `impl` means on `platform` (default: JAX's backend) for sequences of `seq_len`."
    platform = platform or jax.default_backend()
    if impl == 'auto':
        if platform == 'tpu':
            return 'splash' if seq_len is None or seq_len % 128 == 0 else 'blockwise'  # splash's tiles
        if platform == 'gpu': return 'flash'
        return 'xla' if seq_len is None or seq_len <= 512 else 'blockwise'
    if impl not in IMPLEMENTATIONS:
        hint = (
            ' (the sequence-parallel ones register when xgen_small.seqpar is imported)'
            if impl.startswith('seq_')
            else ''
        )
        raise ValueError(
            f"unknown attention implementation {impl!r}; available: "
            f"{', '.join(['auto', *sorted(IMPLEMENTATIONS)])}{hint}"
        )
    if platform not in PLATFORMS[impl]:
        ok = sorted(n for n, p in PLATFORMS.items() if platform in p)
        raise ValueError(
            f"attention implementation {impl!r} does not run on {platform}; available there: {', '.join(['auto', *ok])}"
        )
    return impl

def attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None, *,
              causal: bool = True, impl: str = 'auto', block_sizes: BlockSizes | None = None) -> jax.Array:
    """Grouped-query attention through implementation `impl` (see `IMPLEMENTATIONS`); arguments as in
    `attention_reference`. `auto` is resolved for the platform the program is lowered for (this machine's, or
    `jax.export`'s target)."""
    T = q.shape[1]
    resolve_impl(impl, T)                          # an unknown name, or one this machine cannot run: a clear error now
    def run(name, *args):
        kw = {} if name == 'xla' or block_sizes is None else dict(block_sizes=block_sizes)
        return IMPLEMENTATIONS[name](*args, causal=causal, **kw)
    args = (q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    if impl != 'auto':
        return run(impl, *args)  # flash and splash choose their interpret mode per platform themselves
    per = {
        key: partial(run, resolve_impl('auto', T, platform))
        for platform, keys in _PLATFORM_KEYS.items()
        for key in keys
    }
    return jax.lax.platform_dependent(*args, **per)


# %%
test_close(attention(q, k, v, impl='auto'), ours, eps=tol(1e-7))
test_close(attention(q, k, v, impl='blockwise', block_sizes=BlockSizes(8, 8)), ours, eps=tol(1e-5))
test_eq([resolve_impl('auto', n, p) for n, p in ((256, 'cpu'), (1024, 'cpu'), (8192, 'gpu'), (8192, 'tpu'), (200, 'tpu'))],
        ['xla', 'blockwise', 'flash', 'splash', 'blockwise'])
test_fail(lambda: attention(q, k, v, impl='cudnn'), contains='available: auto, blockwise, flash, splash, xla')
test_fail(lambda: resolve_impl('splash', platform='gpu'), contains='available there: auto, blockwise, flash, xla')
test_eq(resolve_impl('flash', platform='tpu'), 'flash')                   # on request; `auto` prefers splash there
test_fail(lambda: resolve_impl('seq_nowhere', platform='tpu'), contains='unknown attention implementation')
test_fail(lambda: attention_flash(q[:, :8], k, v), contains='self-attention')
test_fail(lambda: BlockSizes(0, 16), contains='block_q')
test_fail(lambda: attention_splash(q, k, v), contains='multiples of 128')


# %% [markdown]
# ## Memory: quadratic versus linear
#
# XLA reports how much scratch memory a compiled program needs. For a forward and backward pass of one
# attention layer (1 sequence, 4 query and 2 key/value heads of 32) the reference grows with the
# square of the length, the blockwise path linearly. `benchmarks/attention.py` measures the whole
# tiny model's training step, in time and peak memory, up to 32K tokens.

# %%
def scratch_mib(fn, T, H=4, K=2, D=32):
    args = [jax.ShapeDtypeStruct((1, T, n, D), jnp.float32) for n in (H, K, K)]
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)))
    return f.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20
print(f"{'tokens':>8}{'reference MiB':>16}{'blockwise MiB':>16}")
mem = {}
for T in (1024, 2048, 4096, 8192):
    mem[T] = (scratch_mib(attention_reference, T), scratch_mib(attention_blockwise, T))
    print(f'{T:>8}{mem[T][0]:>16.1f}{mem[T][1]:>16.1f}')

# %%
test_eq(mem[8192][0] / mem[4096][0] > 3.5, True)     # quadratic: doubling the length ~quadruples memory
test_eq(mem[8192][1] / mem[4096][1] < 2.5, True)     # linear

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
