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
# # Sequence parallelism
#
# > Attention over a sequence split across devices (ring and all-gather), with causal load balancing.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/14_seqpar.ipynb)

# %%
#| default_exp seqpar

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
#| hide
# A plain CPU runtime (Colab's, or a laptop's) shows one device; simulate 8 so the meshes below have something to
# split. It must happen before JAX starts, and changes nothing on a TPU or GPU runtime, whose devices are real. The
# cells below adapt to however many devices there are (one included), so they run anywhere.
import os, sys
if 'jax' not in sys.modules: os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

# %%
#| export
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from xgen_small.attention import (
    NEG,
    BlockSizes,
    attention_defaults,
    blockwise_attention,
    blockwise_backward,
    blockwise_forward,
    merge_partials,
    register_impl,
)

# %%
import flax.linen as nn
import optax
from fastcore.test import test_close, test_eq, test_fail
from flax import nnx
from jax.sharding import NamedSharding

from xgen_small.attention import attention_reference
from xgen_small.config import get_preset
from xgen_small.model import Decoder
from xgen_small.sharding import MeshConfig, data_sharding, logical_spec, make_mesh, shard_model

# %% [markdown]
# Notebook 13 laid parameters and batches out over a mesh. One computation in a Transformer cannot simply follow
# that layout when the *length* is split: attention, where every query needs keys held by other devices. This
# notebook gives it two sequence-parallel implementations, registers them with notebook 11's `attention` entry point
# as `seq_ring` and `seq_allgather`, and balances the causal work across devices. The model then trains with its
# length split over the mesh's `sequence` axis, which is how length extension (notebook 20) reaches contexts that
# do not fit one chip.
#
# The cells run on 8 CPU devices simulated with `XLA_FLAGS=--xla_force_host_platform_device_count=8` (set before
# JAX starts, as the test command does):

# %%
print(jax.devices())


# %% [markdown]
# ## Sequence-parallel attention
#
# With the length split over the `sequence` axis, each device holds a contiguous chunk of every
# sequence. Everything in a Transformer block is per token, except attention, where a query needs
# keys from other chunks. Two classic ways, both written with `jax.shard_map` (each device runs the
# function on its own chunk and talks to the others explicitly):
#
# - **All-gather K/V**: every device gathers all keys and values (they are smaller than the
#   queries under GQA), then attends from its own queries. Simple; memory per device grows with the
#   full length for K/V.
# - **Ring** (Liu et al., 2023, arXiv 2310.01889): devices pass K/V chunks around a ring with
#   `ppermute`, one step per device, and fold each chunk into their queries' running softmax with the
#   same online-softmax update as FlashAttention (notebook 11). No device ever holds more than two K/V
#   chunks, and the transfers overlap with the compute on an accelerator.
#
# Inside each device the work is notebook 11's blockwise attention, so no device ever holds a score matrix larger
# than one `[512, 512]` tile: a chunk's partial result comes back as an output and its log-sum-exp, and two partial
# softmaxes over disjoint keys merge exactly, $\mathrm{lse} = \log(e^{\mathrm{lse}_1} + e^{\mathrm{lse}_2})$,
# $o = e^{\mathrm{lse}_1 - \mathrm{lse}}\,o_1 + e^{\mathrm{lse}_2 - \mathrm{lse}}\,o_2$. Chunks arrive in any
# order, so the causal mask is read from *positions* (`blockwise_forward(..., q_pos=, kv_pos=)`), and tiles that
# no query can see are skipped. The backward pass has its own ring (a custom VJP): the K/V chunks go round again,
# each carrying its gradient accumulators; every device adds its queries' contribution, computed blockwise from the
# *final* output and log-sum-exp, and one last hop brings the accumulators home. Differentiating through the
# forward ring instead would store every hop's intermediate values. All-gather attention uses the same blockwise
# kernel against the gathered keys.
#
# Masks use segment ids and *positions*, which travel with their tokens, so correctness does not
# depend on which device holds which chunk. That is what makes **causal load balancing** free: with
# causal masking the device holding the last chunk does the most work (its queries see everything),
# the first the least. Reordering the sequence so that device $i$ holds chunks $i$ and $2n-1-i$ of
# $2n$ ("zigzag") gives every device the same amount of work, and since positions and segments move
# with the tokens, nothing else changes.

# %%
#| export
def _mesh_axes_for(mesh, B: int, K: int):
    batch = tuple(a for a in ('data', 'fsdp') if mesh.shape.get(a, 1) > 1)
    nb = math.prod(mesh.shape[a] for a in batch)
    if B % nb: raise ValueError(f"batch {B} is not divisible by the data x fsdp mesh axes ({nb})")
    heads = 'tensor' if mesh.shape.get('tensor', 1) > 1 else None
    if heads and K % mesh.shape['tensor']:
        raise ValueError(f"{K} key/value heads are not divisible by the tensor axis ({mesh.shape['tensor']})")
    return (batch or None), heads

_RING_BLOCKS = BlockSizes(512, 512)

def _pass_on(xs):
    "Send each array to the next device around the `sequence` ring."
    n = jax.lax.axis_size('sequence')
    return tuple(jax.lax.ppermute(x, 'sequence', [(i, (i + 1) % n) for i in range(n)]) for x in xs)

def _repeat(loop: bool, step, carry):
    """`carry = step(carry)`, once per ring hop (the axis size minus one): as a `fori_loop`, whose one body the
    compiler plans memory for once, or unrolled. The CPU runtime needs the unrolled form: it may start a loop holding
    collectives beside another collective of the same program, and with more simulated devices than threads they
    wait on each other forever."""
    hops = jax.lax.axis_size('sequence') - 1
    if loop: return jax.lax.fori_loop(0, hops, lambda _, c: step(c), carry)
    for _ in range(hops): carry = step(carry)
    return carry

def _ring_forward(q, k, v, qs, ks, qp, kp, causal, bs, loop):
    B, T, H, D = q.shape
    qf = q.astype(jnp.float32)
    def fold(state, kv):
        o_c, l_c = blockwise_forward(qf, kv[0], kv[1], qs, kv[2], causal=causal, block_sizes=bs, scale=D ** -0.5,
                                     q_pos=qp, kv_pos=kv[3])
        return merge_partials(*state, o_c, l_c)
    state = jnp.zeros((B, T, H, D), jnp.float32), jnp.full((B, H, T), -NEG, jnp.float32)   # no key seen yet
    # n - 1 times: fold the chunk held, pass it on; then fold the last
    state, kv = _repeat(loop, lambda c: (fold(*c), _pass_on(c[1])), (state, (k, v, ks, kp)))
    out, lse = fold(state, kv)
    return out.astype(q.dtype), lse

@partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _ring(q, k, v, qs, ks, qp, kp, causal, bs, loop):
    return _ring_forward(q, k, v, qs, ks, qp, kp, causal, bs, loop)[0]

def _ring_fwd(q, k, v, qs, ks, qp, kp, causal, bs, loop):
    out, lse = _ring_forward(q, k, v, qs, ks, qp, kp, causal, bs, loop)
    return out, (q, k, v, qs, ks, qp, kp, out, lse)

def _ring_bwd(causal, bs, loop, res, do):
    """The ring again: each K/V chunk travels with its gradient accumulators, gathering every device's contribution
    (computed blockwise from the final output and log-sum-exp), and one last hop brings them home."""
    q, k, v, qs, ks, qp, kp, out, lse = res
    qf = q.astype(jnp.float32)
    def grads(dq, kv, dkv):
        dq_c, dk_c, dv_c = blockwise_backward(
            qf, kv[0].astype(jnp.float32), kv[1].astype(jnp.float32), qs, kv[2], out, lse, do, causal=causal,
            block_sizes=bs, scale=q.shape[-1] ** -0.5, q_pos=qp, kv_pos=kv[3]
        )
        return dq + dq_c, (dkv[0] + dk_c, dkv[1] + dv_c)
    def step(c):
        dq, kv, dkv = c
        dq, dkv = grads(dq, kv, dkv)
        return dq, _pass_on(kv), _pass_on(dkv)
    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, kv, dkv = _repeat(loop, step, (jnp.zeros(q.shape, jnp.float32), (k, v, ks, kp), zeros))
    dq, dkv = grads(dq, kv, dkv)
    dk, dv = _pass_on(dkv)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None

_ring.defvjp(_ring_fwd, _ring_bwd)

def _ring_local(q, k, v, qs, ks, qp, kp, *, causal, loop):
    "Per device: fold the K/V chunk it holds, pass it on around the ring, fold the next, `n` times."
    return _ring(q, k, v, qs, ks, qp, kp, causal, _RING_BLOCKS, loop)

def _allgather_local(q, k, v, qs, ks, qp, kp, *, causal):
    "Per device: gather every chunk's keys and values, then attend blockwise from this device's queries."
    gather = lambda x: jax.lax.all_gather(x, 'sequence', axis=1, tiled=True)
    return blockwise_attention(q, gather(k), gather(v), qs, gather(ks), causal=causal, block_sizes=_RING_BLOCKS,
                               q_pos=qp, kv_pos=gather(kp))

def _sequence_parallel(local, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or 'sequence' not in mesh.axis_names:
        raise ValueError(
            "sequence-parallel attention needs an active mesh with a 'sequence' axis (use `with jax.set_mesh(mesh):`)"
        )
    B, T = q.shape[:2]
    if T != k.shape[1]:
        raise ValueError("sequence-parallel attention computes self-attention (query and key lengths differ)")
    if T % mesh.shape['sequence']:
        raise ValueError(f"length {T} is not divisible by the sequence axis ({mesh.shape['sequence']})")
    qs, ks, qp, kp = attention_defaults(q, k, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    batch, heads = _mesh_axes_for(mesh, B, k.shape[2])
    sq, st = P(batch, 'sequence', heads, None), P(batch, 'sequence')
    f = jax.shard_map(
        partial(local, causal=causal), mesh=mesh, in_specs=(sq, sq, sq, st, st, st, st), out_specs=sq, check_vma=False
    )
    return f(q, k, v, qs.astype(jnp.int32), ks.astype(jnp.int32), qp.astype(jnp.int32), kp.astype(jnp.int32))

def attention_ring(
    q, k, v, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None, *, causal=True,
    loop: bool | None = None, **_
):
    """Ring attention over the mesh's `sequence` axis: K/V chunks passed around with ppermute, each folded in
    blockwise. `loop`: the hops as a loop (default on TPU and GPU) or unrolled (default on CPU; see `_repeat`)."""
    run = lambda loop, *a: _sequence_parallel(partial(_ring_local, loop=loop), *a, causal)
    args = (q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    if loop is not None: return run(loop, *args)
    return jax.lax.platform_dependent(*args, cpu=partial(run, False), default=partial(run, True))

def attention_allgather(
    q, k, v, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None, *, causal=True, **_
):
    "Sequence-parallel attention that all-gathers K/V over the mesh's `sequence` axis."
    return _sequence_parallel(
        _allgather_local, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal
    )

register_impl('seq_ring', attention_ring)
register_impl('seq_allgather', attention_allgather)

# %% [markdown]
# Both against the single-device reference on 8 devices, with GQA and three packed documents per
# row, forward and gradients:

# %%
ks = jax.random.split(jax.random.key(0), 4)
B, T, H, K, D = 2, 64, 4, 2, 16
q = jax.random.normal(ks[0], (B, T, H, D)); k = jax.random.normal(ks[1], (B, T, K, D)); v = jax.random.normal(ks[2], (B, T, K, D))
seg = jnp.sort(jax.random.randint(ks[3], (B, T), 1, 4), axis=1)
pos = jnp.arange(T)[None] - jnp.argmax(seg[..., None] == seg[:, None, :], axis=-1)
ref_fn = lambda q, k, v: attention_reference(q, k, v, seg, seg, pos, pos)
w = jax.random.normal(jax.random.key(5), q.shape)
ref_out, ref_g = ref_fn(q, k, v), jax.grad(lambda *a: jnp.sum(ref_fn(*a) * w), argnums=(0, 1, 2))(q, k, v)
n = jax.device_count()
# float32 on a CPU agrees to rounding; TPUs and GPUs run these matmuls in bfloat16 (XLA's default matmul precision
# there, and the model's 'auto' compute dtype), which agrees to about three significant digits
tol = 1e-5 if jax.default_backend() == 'cpu' else 3e-2
meshes = ((MeshConfig(fsdp=1, sequence=8), MeshConfig(data=2, sequence=4), MeshConfig(fsdp=2, sequence=2, tensor=2))
          if n == 8 else (MeshConfig(fsdp=1, sequence=-1),))       # fewer devices: the sequence axis takes them all
for mcfg in meshes:
    mesh = make_mesh(mcfg)
    for name, fn in (('ring', attention_ring), ('ring loop', partial(attention_ring, loop=True)),
                     ('all-gather', attention_allgather)):
        f = lambda q, k, v: fn(q, k, v, seg, seg, pos, pos)
        with jax.set_mesh(mesh):
            out = jax.jit(f)(q, k, v)
            g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(q, k, v)
        err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *g), (ref_out, *ref_g)))
        print(f'{str(dict(mesh.shape)):58} {name:10} max |error| {err:.1e}')
        test_close(err, 0.0, eps=tol)

# %%
test_fail(lambda: attention_ring(q, k, v), contains='active mesh')


# %% [markdown]
# ### Memory per device
#
# The ring's hops run as a `fori_loop` on TPUs and GPUs, so the compiler plans one hop's buffers and reuses them;
# on a CPU they are unrolled (`loop=False`), because the CPU runtime may start a loop that holds collectives beside
# another collective of the same program and, with more simulated devices than threads, both wait forever. (That is
# a property of the simulated devices, not of the algorithm; both forms compute the same thing, checked above.)
#
# What a device needs, compiled for forward and backward and never run: with the same tokens per device, ring
# attention's memory stays flat as the ring grows, while plain attention under XLA's sharding, which materialises
# the `[T, T]` scores, grows with the square of the length:

# %%
def temp_gib(fn, T, seq, H=4, K=2, D=16):
    "Compiled temporary memory per device (GiB) of attention's forward and backward at length T over `seq` devices."
    mesh = make_mesh(MeshConfig(data=n // seq, fsdp=1, sequence=seq))
    sh = NamedSharding(mesh, P('data', 'sequence'))
    qa = jax.ShapeDtypeStruct((n // seq, T, H, D), jnp.float32, sharding=sh)
    ka = jax.ShapeDtypeStruct((n // seq, T, K, D), jnp.float32, sharding=sh)
    grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2))
    with jax.set_mesh(mesh):
        return jax.jit(grad).lower(qa, ka, ka).compile().memory_analysis().temp_size_in_bytes / 2**30

rows = [(T, seq) for T, seq in ((2048, 2), (8192, 2), (8192, 8)) if seq <= n]
mem = {(T, seq): {name: temp_gib(fn, T, seq) for name, fn in
                  (('ring', partial(attention_ring, loop=True)), ('plain', attention_reference))} for T, seq in rows}
print(f"{'tokens':>7} {'sequence':>8} {'per device':>10} | {'ring GiB':>8} {'plain GiB':>9}")
for (T, seq), m in mem.items(): print(f"{T:>7,} {seq:>8} {T // seq:>10,} | {m['ring']:>8.3f} {m['plain']:>9.3f}")

# %%
if n >= 2:
    test_eq(mem[(8192, 2)]['ring'] < 6 * mem[(2048, 2)]['ring'], True)          # 4x the tokens per device: linear
    test_eq(mem[(8192, 2)]['plain'] > 10 * mem[(2048, 2)]['plain'], True)       # quadratic
if n == 8: test_eq(mem[(8192, 8)]['ring'] < mem[(8192, 2)]['ring'], True)      # a longer ring: less per device


# %% [markdown]
# At the xgen recipe's shapes (`xgen_4b`'s 24 query and 8 key/value heads of 128, bfloat16, the recipe's sequence
# degrees) `benchmarks/seqpar_memory.py` prints, per device and per attention layer: 32K tokens on one device 2.3
# GiB; 128K over 4 and 256K over 8 devices 4.4 GiB each with the loop (6.9 and 12.0 GiB unrolled), where plain
# attention would need 2.3 and 4.6 TB.

# %% [markdown]
# ### Zigzag load balancing
#
# `zigzag_order(T, n)` is the permutation of positions that gives device $i$ chunks $i$ and
# $2n - 1 - i$. Applying it to every `[batch, length]` array of a batch (tokens, targets, segment ids,
# positions, loss mask) changes nothing about the loss, and evens out causal attention's work:

# %%
#| export
def zigzag_order(length: int, n: int) -> np.ndarray:
    "Permutation of `range(length)` giving shard i of n the chunks i and 2n-1-i (of 2n equal chunks)."
    if length % (2 * n):
        raise ValueError(f"length {length} must be divisible by 2 x {n} sequence shards for zigzag balancing")
    c = length // (2 * n)
    chunks = np.arange(length).reshape(2 * n, c)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])

def zigzag_batch(batch: dict, n: int) -> dict:
    "Apply `zigzag_order` along the length axis of every [batch, length] array in `batch`."
    L = next(v.shape[1] for v in batch.values() if getattr(v, 'ndim', 0) == 2)
    order = zigzag_order(L, n)
    return {k: (v[:, order] if getattr(v, 'ndim', 0) == 2 else v) for k, v in batch.items()}


# %%
n = 4; T = 32
order = zigzag_order(T, n)
work = lambda o: [int(sum(o[i * T // n:(i + 1) * T // n] + 1)) for i in range(n)]   # keys each shard's queries see
print('contiguous:', work(np.arange(T)), ' zigzag:', work(order))

# %%
test_eq(sorted(order.tolist()), list(range(T)))
test_eq(len(set(work(order))), 1)                              # perfectly balanced
mesh = make_mesh(MeshConfig(fsdp=1, sequence=-1))
zz = zigzag_order(T := 64, n)
with jax.set_mesh(mesh):
    out_zz = jax.jit(lambda q, k, v: attention_ring(q, k, v, seg[:, zz], seg[:, zz], pos[:, zz], pos[:, zz]))(q[:, zz], k[:, zz], v[:, zz])
test_close(out_zz, ref_out[:, zz], eps=tol)                   # same outputs, just in zigzag order


# %% [markdown]
# ## A sharded forward and backward pass of the model
#
# With `attention_impl='seq_ring'` the model's attention goes through the ring; the parameters are
# FSDP-sharded by the rules, the batch is placed by `data_sharding`, and activations follow the
# `constrain` annotations. The loss and gradients equal the single-device ones;
# `tests/test_train.py` checks this for the full train step (notebook 18) over several meshes.

# %%
def loss_fn(m, b):
    logits = m(b['inputs'], b['positions'], b['segment_ids'])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, b['targets'])
    return jnp.sum(ce * b['mask']) / jnp.sum(b['mask'])
tok = jax.random.randint(jax.random.key(1), (4, 64), 0, 4096)
batch = dict(inputs=tok, targets=jnp.roll(tok, -1, 1), positions=pos[:1].repeat(4, 0), segment_ids=seg[:1].repeat(4, 0),
             mask=jnp.ones((4, 64)).at[:, -1].set(0))
single = Decoder(get_preset('tiny'), rngs=nnx.Rngs(0))
l_ref, g_ref = nnx.value_and_grad(loss_fn)(single, batch)

mcfg = MeshConfig(fsdp=2, sequence=4) if n == 8 else MeshConfig(fsdp=1, sequence=-1)
mesh = make_mesh(mcfg)
sharded = shard_model(Decoder(get_preset('tiny', attention_impl='seq_ring'), rngs=nnx.Rngs(0)), mesh)
b_sh = {k: jax.device_put(v, data_sharding(mesh)) for k, v in batch.items()}
with jax.set_mesh(mesh), nn.logical_axis_rules(mcfg.rules):
    l_sh, g_sh = nnx.jit(nnx.value_and_grad(loss_fn))(sharded, b_sh)
errs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(nnx.state(g_sh)), jax.tree.leaves(nnx.state(g_ref)))]
print(f'loss {float(l_ref):.6f} (1 device) vs {float(l_sh):.6f} ({dict(mesh.shape)}); max |grad difference| {max(errs):.1e}')

# %%
test_close(float(l_sh), float(l_ref), eps=tol)
test_close(max(errs), 0.0, eps=tol)
test_eq(sharded.layers.mlp.up.get_value().sharding.is_equivalent_to(NamedSharding(mesh, logical_spec(('layers', 'embed', 'mlp'))), 3), True)

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
