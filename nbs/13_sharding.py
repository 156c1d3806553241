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
# # Sharding
#
# > A device mesh with data, FSDP, sequence and tensor axes; one table of rules from logical to mesh axes; and sequence-parallel attention (all-gather and ring variants, with causal load balancing) that computes exactly what one device computes.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/13_sharding.ipynb)

# %%
#| default_exp sharding

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
import os
from dataclasses import dataclass, field
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from xgen_small.attention import NEG, attention_reference

# %%
from fastcore.test import test_eq, test_close, test_fail
import optax
from xgen_small.config import get_preset
from xgen_small.model import Decoder

# %% [markdown]
# xGen-small pre-trains on TPU v5p pods with FSDP and sequence-parallel attention. Both are ways of
# laying arrays out over a grid of devices, the **mesh**. Ours has four named axes:
#
# | axis | splits | what it buys |
# |---|---|---|
# | `data` | the batch | throughput; every device holds a full copy of the weights |
# | `fsdp` | the batch *and* every weight (fully sharded data parallelism, ZeRO-3) | memory: weights, gradients and optimizer state are divided by the axis size, gathered one layer at a time when needed |
# | `sequence` | the length of each sequence | long context: activations and attention for 128K tokens do not fit one chip |
# | `tensor` | attention heads and MLP columns | very wide layers (not needed at 4B/9B, kept for completeness) |
#
# The model never mentions devices: every parameter carries logical axis names (notebook 10), and
# activations are annotated with `constrain`. One table of **rules** maps logical names to mesh axes.
# The same model code then runs on one CPU, 8 simulated CPU devices (what this notebook uses) and a
# pod; only the mesh and the rules change.
#
# Here is JAX's view of this machine (8 CPU devices, simulated with
# `XLA_FLAGS=--xla_force_host_platform_device_count=8`, which CI and these notebooks set):

# %%
jax.devices()

# %% [markdown]
# ## The mesh
#
# Axis sizes come from config; one of them may be -1, meaning "whatever is left". On a TPU pod with
# several hosts, `init_distributed` calls `jax.distributed.initialize()` first (JAX's multi-host
# runtime discovers its peers from the TPU environment), so that `jax.devices()` lists every chip in
# the slice; on a single host there is nothing to do.

# %%
#| export
MESH_AXES = ('data', 'fsdp', 'sequence', 'tensor')

# logical axis -> mesh axes, in order of preference. A mesh axis is used at most once per array:
# activations ('batch', 'length', 'embed') put the batch on data+fsdp, so 'embed' stays whole there,
# while a weight ('embed', 'mlp') is split on fsdp along 'embed'.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', 'sequence'),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('mlp', 'tensor'),
    ('q_heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('norm', None),
    ('layers', None),
)

@dataclass(frozen=True)
class MeshConfig:
    "Sizes of the mesh axes (-1: infer from the device count) and the logical-to-mesh rules."
    data: int = 1
    fsdp: int = -1
    sequence: int = 1
    tensor: int = 1
    rules: tuple = DEFAULT_RULES

    def shape(self, n_devices: int) -> dict:
        "Concrete axis sizes for `n_devices` devices."
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        bad = [a for a, s in sizes.items() if s == 0 or s < -1]
        if bad: raise ValueError(f"mesh axis sizes must be positive or -1, got {dict((a, sizes[a]) for a in bad)}")
        unknown = [a for a, s in sizes.items() if s == -1]
        if len(unknown) > 1: raise ValueError(f"only one mesh axis may be -1, got {unknown}")
        known = math.prod(s for s in sizes.values() if s != -1)
        if unknown:
            if n_devices % known: raise ValueError(f"{n_devices} devices cannot be split into {sizes} (fixed axes use {known})")
            sizes[unknown[0]] = n_devices // known
        if math.prod(sizes.values()) != n_devices:
            raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but there are {n_devices}")
        return sizes

def init_distributed() -> bool:
    "Join JAX's multi-host runtime when running on a TPU pod or a configured cluster; returns whether it did."
    cluster = any(v in os.environ for v in ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS'))
    multi = os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0 or 'JAX_COORDINATOR_ADDRESS' in os.environ
    if cluster and multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()
        return True
    return False

def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> jax.sharding.Mesh:
    "A mesh with axes (data, fsdp, sequence, tensor) over `devices` (default: all)."
    devices = list(devices if devices is not None else jax.devices())
    sizes = cfg.shape(len(devices))
    # 'Auto' axes: XLA's partitioner propagates shardings from our annotations (GSPMD style), rather than every
    # array carrying an explicit sharding in its type
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))

# %%
for c in (MeshConfig(), MeshConfig(data=2, fsdp=2, sequence=2), MeshConfig(fsdp=2, sequence=-1)):
    print(dict(make_mesh(c).shape))

# %%
test_eq(dict(make_mesh(MeshConfig(data=2, fsdp=-1)).shape), {'data': 2, 'fsdp': 4, 'sequence': 1, 'tensor': 1})
test_fail(lambda: make_mesh(MeshConfig(data=3)), contains='cannot be split')
test_fail(lambda: make_mesh(MeshConfig(data=2, fsdp=2, sequence=1, tensor=1)), contains='needs 4 devices')
test_fail(lambda: MeshConfig(data=-1, fsdp=-1).shape(8), contains='only one mesh axis')
test_eq(init_distributed(), False)     # one host: nothing to do

# %% [markdown]
# ## Parameters: from logical names to shardings
#
# `param_specs` reads each parameter's logical names and applies the rules (Flax resolves them and
# makes sure no mesh axis is used twice in one array). A dimension that does not divide by its mesh
# axis is refused with the parameter's name, rather than padded or silently replicated.

# %%
#| export
def logical_spec(axes, rules=DEFAULT_RULES) -> P:
    "The mesh PartitionSpec of an array with logical axis names `axes`."
    with nn.logical_axis_rules(rules): return nn.logical_to_mesh_axes(tuple(axes))

def param_specs(model, rules=DEFAULT_RULES) -> nnx.State:
    "PartitionSpec of every parameter of `model`, from its logical axis names."
    with nn.logical_axis_rules(rules): return nnx.get_partition_spec(nnx.state(model, nnx.Param))

def _check_divisible(path, shape, spec, mesh):
    for dim, axes in zip(shape, spec):
        if axes is None: continue
        n = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        if dim % n: raise ValueError(f"parameter {'.'.join(map(str, path))} {tuple(shape)}: dimension {dim} is not divisible by mesh axes {axes} ({n} devices)")

def shard_model(model, mesh, rules=DEFAULT_RULES):
    "Place every parameter of `model` on `mesh` as the rules say (in place); returns the model."
    specs = param_specs(model, rules)
    for (path, var), (_, spec) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(specs)):
        spec = spec.get_value() if hasattr(spec, 'get_value') else spec
        _check_divisible(path, var.shape, spec, mesh)
        var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))
    return model

def data_sharding(mesh, rules=DEFAULT_RULES) -> NamedSharding:
    "Sharding of `[batch, length]` arrays: batch over data and fsdp, length over sequence."
    return NamedSharding(mesh, logical_spec(('batch', 'length'), rules))

# %%
mesh = make_mesh(MeshConfig(data=2, fsdp=4))
model = shard_model(Decoder(get_preset('tiny'), rngs=nnx.Rngs(0)), mesh)
for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))[:6]:
    print(f"{'.'.join(map(str, path)):22} {str(v.shape):18} {v.get_metadata()['out_sharding']!s:42} -> {v.get_value().sharding.spec}")

# %%
for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    test_eq(v.get_value().sharding.spec, logical_spec(v.get_metadata()['out_sharding']))
test_eq(model.embed.get_value().sharding.spec, P('tensor', 'fsdp'))      # vocab on tensor (size 1 here), embed on fsdp
test_eq(model.embed.get_value().addressable_shards[0].data.shape, (4096, 32))       # a quarter of each row per device
test_fail(lambda: shard_model(Decoder(get_preset('tiny', d_model=100, n_heads=4, head_dim=26, d_ff=60, n_kv_heads=2), rngs=nnx.Rngs(0)),
                              make_mesh(MeshConfig(fsdp=8))), contains='not divisible')

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
    if heads and K % mesh.shape['tensor']: raise ValueError(f"{K} key/value heads are not divisible by the tensor axis ({mesh.shape['tensor']})")
    return (batch or None), heads

def _fold(carry, q, k, v, qs, ks, qp, kp, causal):
    "One online-softmax step: fold a key/value chunk into the running (acc, m, l) of local queries."
    acc, m, l = carry
    s = jnp.einsum('btkgd,bskd->btkgs', q, k)
    mask = qs[:, :, None] == ks[:, None, :]
    if causal: mask &= kp[:, None, :] <= qp[:, :, None]
    mask = mask[:, :, None, None]
    s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    a = jnp.exp(m - m_new)
    return acc * a[..., None] + jnp.einsum('btkgs,bskd->btkgd', p, v), m_new, l * a + p.sum(-1)

def _ring_local(q, k, v, qs, ks, qp, kp, *, causal):
    n = jax.lax.axis_size('sequence')
    B, T, H, D = q.shape; K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, D).astype(jnp.float32) * D ** -0.5
    carry = (jnp.zeros(qg.shape, jnp.float32), jnp.full(qg.shape[:-1], NEG, jnp.float32), jnp.zeros(qg.shape[:-1], jnp.float32))
    kv = (k.astype(jnp.float32), v.astype(jnp.float32), ks, kp)
    ring = [(i, (i + 1) % n) for i in range(n)]
    for step in range(n):
        carry = _fold(carry, qg, *kv[:2], qs, kv[2], qp, kv[3], causal)
        if step < n - 1: kv = tuple(jax.lax.ppermute(x, 'sequence', ring) for x in kv)
    acc, m, l = carry
    return (acc / jnp.where(l == 0, 1.0, l)[..., None]).reshape(B, T, H, D).astype(q.dtype)

def _allgather_local(q, k, v, qs, ks, qp, kp, *, causal):
    gather = lambda x: jax.lax.all_gather(x, 'sequence', axis=1, tiled=True)
    return attention_reference(q, gather(k), gather(v), qs, gather(ks), qp, gather(kp), causal=causal)

def _sequence_parallel(local, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or 'sequence' not in mesh.axis_names:
        raise ValueError("sequence-parallel attention needs an active mesh with a 'sequence' axis (use `with jax.set_mesh(mesh):`)")
    B, T = q.shape[:2]
    if T != k.shape[1]: raise ValueError("sequence-parallel attention computes self-attention (query and key lengths differ)")
    if T % mesh.shape['sequence']: raise ValueError(f"length {T} is not divisible by the sequence axis ({mesh.shape['sequence']})")
    ones = jnp.ones((B, T), jnp.int32); idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    qs = ones if q_segment_ids is None else q_segment_ids
    ks = qs if kv_segment_ids is None else kv_segment_ids
    qp = idx if q_positions is None else q_positions
    kp = qp if kv_positions is None else kv_positions
    batch, heads = _mesh_axes_for(mesh, B, k.shape[2])
    sq, st = P(batch, 'sequence', heads, None), P(batch, 'sequence')
    f = jax.shard_map(partial(local, causal=causal), mesh=mesh, in_specs=(sq, sq, sq, st, st, st, st), out_specs=sq, check_vma=False)
    return f(q, k, v, qs.astype(jnp.int32), ks.astype(jnp.int32), qp.astype(jnp.int32), kp.astype(jnp.int32))

def attention_ring(q, k, v, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None, *, causal=True, **_):
    "Ring attention over the mesh's `sequence` axis (K/V chunks passed around with ppermute)."
    return _sequence_parallel(_ring_local, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal)

def attention_allgather(q, k, v, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None, *, causal=True, **_):
    "Sequence-parallel attention that all-gathers K/V over the mesh's `sequence` axis."
    return _sequence_parallel(_allgather_local, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal)

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
for mcfg in (MeshConfig(fsdp=1, sequence=8), MeshConfig(data=2, sequence=4), MeshConfig(fsdp=2, sequence=2, tensor=2)):
    mesh = make_mesh(mcfg)
    for name, fn in (('ring', attention_ring), ('all-gather', attention_allgather)):
        f = lambda q, k, v: fn(q, k, v, seg, seg, pos, pos)
        with jax.set_mesh(mesh):
            out = jax.jit(f)(q, k, v)
            g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(q, k, v)
        err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *g), (ref_out, *ref_g)))
        print(f'{str(dict(mesh.shape)):58} {name:10} max |error| {err:.1e}')
        test_close(err, 0.0, eps=1e-5)

# %%
test_fail(lambda: attention_ring(q, k, v), contains='active mesh')

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
    if length % (2 * n): raise ValueError(f"length {length} must be divisible by 2 x {n} sequence shards for zigzag balancing")
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
mesh = make_mesh(MeshConfig(sequence=8))
zz = zigzag_order(T := 64, 8)
with jax.set_mesh(mesh):
    out_zz = jax.jit(lambda q, k, v: attention_ring(q, k, v, seg[:, zz], seg[:, zz], pos[:, zz], pos[:, zz]))(q[:, zz], k[:, zz], v[:, zz])
test_close(out_zz, ref_out[:, zz], eps=1e-5)                   # same outputs, just in zigzag order

# %% [markdown]
# ## A sharded forward and backward pass of the model
#
# With `attention_impl='seq_ring'` the model's attention goes through the ring; the parameters are
# FSDP-sharded by the rules, the batch is placed by `data_sharding`, and activations follow the
# `constrain` annotations. The loss and gradients equal the single-device ones;
# `tests/test_sharding.py` checks this for the full train step (notebook 15) over several meshes.

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

mcfg = MeshConfig(fsdp=2, sequence=4)
mesh = make_mesh(mcfg)
sharded = shard_model(Decoder(get_preset('tiny', attention_impl='seq_ring'), rngs=nnx.Rngs(0)), mesh)
b_sh = {k: jax.device_put(v, data_sharding(mesh)) for k, v in batch.items()}
with jax.set_mesh(mesh), nn.logical_axis_rules(mcfg.rules):
    l_sh, g_sh = nnx.jit(nnx.value_and_grad(loss_fn))(sharded, b_sh)
errs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(nnx.state(g_sh)), jax.tree.leaves(nnx.state(g_ref)))]
print(f'loss {float(l_ref):.6f} (1 device) vs {float(l_sh):.6f} ({dict(mesh.shape)}); max |grad difference| {max(errs):.1e}')

# %%
test_close(float(l_sh), float(l_ref), eps=1e-5)
test_close(max(errs), 0.0, eps=1e-5)
test_eq(sharded.layers.mlp.up.get_value().sharding.is_equivalent_to(NamedSharding(mesh, logical_spec(('layers', 'embed', 'mlp'))), 3), True)

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
