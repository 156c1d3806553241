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
# > A device mesh (data, FSDP, sequence, tensor) and one table of rules from logical names to mesh axes.
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
import os
from dataclasses import dataclass

import flax.linen as nn
import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from xgen_small.config import Config

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
# The same model code then runs on one CPU, 8 simulated CPU devices (what this notebook shows) and a
# pod; only the mesh and the rules change.
#
# Here is JAX's view of this machine (8 CPU devices, simulated with
# `XLA_FLAGS=--xla_force_host_platform_device_count=8`, which CI and these notebooks set on a CPU). On a runtime with
# one device (a single TPU chip, one GPU) every mesh below collapses to one device, and the cells still run:

# %%
n = jax.device_count()
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
class MeshConfig(Config):
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
            if n_devices % known:
                raise ValueError(f"{n_devices} devices cannot be split into {sizes} (fixed axes use {known})")
            sizes[unknown[0]] = n_devices // known
        if math.prod(sizes.values()) != n_devices:
            raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but there are {n_devices}")
        return sizes

def init_distributed() -> bool:
    "Join JAX's multi-host runtime when running on a TPU pod or a configured cluster; returns whether it did."
    cluster = any(
        v in os.environ for v in ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS')
    )
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
    try: print(dict(make_mesh(c).shape))
    except ValueError as e: print(e)             # with fewer than 8 devices some of these do not fit, and say so

# %%
if n % 2 == 0: test_eq(dict(make_mesh(MeshConfig(data=2, fsdp=-1)).shape), {'data': 2, 'fsdp': n // 2, 'sequence': 1, 'tensor': 1})
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

def check_divisible(path, shape, spec, mesh):
    "Raise, naming the parameter, if a dimension of `shape` does not split evenly over its mesh axes in `spec`."
    for dim, axes in zip(shape, spec):
        if axes is None: continue
        n = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
        if dim % n:
            raise ValueError(
                f"parameter {'.'.join(map(str, path))} {tuple(shape)}: dimension {dim} is not divisible by mesh axes "
                f"{axes} ({n} devices)"
            )

def shard_model(model, mesh, rules=DEFAULT_RULES):
    "Place every parameter of `model` on `mesh` as the rules say (in place); returns the model."
    specs = param_specs(model, rules)
    for (path, var), (_, spec) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(specs)):
        spec = spec.get_value() if hasattr(spec, 'get_value') else spec
        check_divisible(path, var.shape, spec, mesh)
        var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))
    return model

def data_sharding(mesh, rules=DEFAULT_RULES) -> NamedSharding:
    "Sharding of `[batch, length]` arrays: batch over data and fsdp, length over sequence."
    return NamedSharding(mesh, logical_spec(('batch', 'length'), rules))

# %%
mesh = make_mesh(MeshConfig(data=2, fsdp=-1) if n % 2 == 0 else MeshConfig())
model = shard_model(Decoder(get_preset('tiny'), rngs=nnx.Rngs(0)), mesh)
for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))[:6]:
    print(f"{'.'.join(map(str, path)):22} {str(v.shape):18} {v.get_metadata()['out_sharding']!s:42} -> {v.get_value().sharding.spec}")

# %%
for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    test_eq(v.get_value().sharding.spec, logical_spec(v.get_metadata()['out_sharding']))
test_eq(model.embed.get_value().sharding.spec, P('tensor', 'fsdp'))      # vocab on tensor (size 1 here), embed on fsdp
# each device holds 1/fsdp of every row (a quarter on 8 devices as data=2 x fsdp=4)
test_eq(model.embed.get_value().addressable_shards[0].data.shape, (4096, 128 // mesh.shape['fsdp']))
odd = get_preset('tiny', d_model=100, n_heads=4, head_dim=26, d_ff=60, n_kv_heads=2)      # 100 does not split 8 ways
if n == 8: test_fail(lambda: shard_model(Decoder(odd, rngs=nnx.Rngs(0)), make_mesh(MeshConfig(fsdp=8))), contains='not divisible')

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
