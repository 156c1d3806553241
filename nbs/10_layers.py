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
# # Layers
#
# > RMSNorm, rotary embeddings with a configurable base and scaling, and SwiGLU, with logical axis names.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/10_layers.ipynb)

# %%
#| default_exp layers

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
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen import with_logical_constraint

from xgen_small.config import ModelConfig

# %%
from fastcore.test import test_eq, test_close, test_fail


# %% [markdown]
# ## Parameters with logical axis names
#
# Every weight carries a tuple of *logical* axis names, one per dimension: the embedding table is
# `('vocab', 'embed')`, an MLP input matrix `('embed', 'mlp')`. The names say what a dimension
# *means*; a single table of rules (notebook 13) later says which mesh axis each meaning is split
# over (FSDP shards `embed` across devices, sequence parallelism splits `length`). The model never
# mentions a device or a mesh, so the same code runs on one CPU and on a TPU pod.
#
# Flax NNX keeps the names as `out_sharding` metadata on each `nnx.Param`. We turn off eager
# sharding: a variable created with names but no mesh would otherwise refuse to exist.

# %%
#| export
def logical_param(key, shape: tuple, axes: tuple, dtype, init: str = 'normal', std: float = 0.02) -> nnx.Param:
    "An `nnx.Param` of `shape` with logical axis names `axes`; `init` is `'normal'` (scaled by `std`) or `'ones'`."
    if len(axes) != len(shape): raise ValueError(f"{len(shape)} dims but {len(axes)} axis names {axes}")
    value = jnp.ones(shape, dtype) if init == 'ones' else std * jax.random.normal(key, shape, dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)

def constrain(x: jax.Array, axes: tuple) -> jax.Array:
    "Annotate activation `x` with logical axis names; a no-op unless sharding rules are active (notebook 13)."
    return with_logical_constraint(x, axes)

def dense(x: jax.Array, w: jax.Array, n_in: int = 1, preferred_element_type=None) -> jax.Array:
    """`x[..., *in] @ w[*in, *out]` as one 2-D matmul. Same result as the einsum; XLA's CPU backend computes
    the weight gradient of a 2-D matmul much faster than one contracting over batch *and* length."""
    lead, din = x.shape[:x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
    y = jnp.matmul(x.reshape(-1, din), w.reshape(din, -1), preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *w.shape[n_in:])


# %%
w = logical_param(jax.random.key(0), (8, 16), ('embed', 'mlp'), jnp.float32)
w.get_metadata()['out_sharding'], w.shape

# %%
test_eq(w.get_metadata()['out_sharding'], ('embed', 'mlp'))
test_close(float(jnp.std(w[...])), 0.02, eps=0.01)
test_fail(lambda: logical_param(jax.random.key(0), (8, 16), ('embed',), jnp.float32), contains='axis names')


# %% [markdown]
# ## RMSNorm
#
# Llama normalises by the root mean square only (no mean subtraction, no bias):
# $y = x / \sqrt{\overline{x^2} + \epsilon} \cdot g$. We always compute the statistic in float32,
# whatever the compute dtype: a sum of 4096 squared bfloat16 values loses most of its digits.

# %%
#| export
class RMSNorm(nnx.Module):
    "Root-mean-square layer norm with a learned scale, computed in float32."
    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = logical_param(None, (dim,), ('norm',), param_dtype, init='ones')

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


# %%
norm = RMSNorm(4)
x = jnp.array([[1., 2., 3., 4.]])
norm(x)

# %%
test_close(norm(x), x / np.sqrt(np.mean(np.square(x)) + 1e-5), eps=1e-6)
test_eq(norm(x.astype(jnp.bfloat16)).dtype, jnp.bfloat16)
test_close(jnp.sqrt(jnp.mean(RMSNorm(64)(jax.random.normal(jax.random.key(1), (3, 64))) ** 2, -1)), jnp.ones(3), eps=1e-4)


# %% [markdown]
# ## Rotary position embeddings
#
# RoPE (Su et al., 2021, arXiv 2104.09864) encodes position $p$ by rotating each pair of
# query/key channels $i$ by the angle $p\,\omega_i$, with frequencies
# $\omega_i = \theta^{-2i/h}$ for $i < h/2$. A query at $p$ and a key at $q$ then meet at an angle
# that depends only on $p - q$: attention sees *relative* positions. We use the "rotate half"
# channel layout of Hugging Face Llama checkpoints (pairs are $(x_i, x_{i+h/2})$), so released weights
# load without permuting anything.
#
# The base $\theta$ sets the longest wavelength, $2\pi\theta^{(h-2)/h}$ tokens. Extending the context
# (notebook 20) changes exactly the two knobs below, which is why they are configuration:
#
# - **base** `rope_theta`: a larger base slows every rotation, so far-apart tokens stay distinguishable;
# - **scaling** `rope_scaling`: `'linear'` position interpolation (Chen et al., 2023, arXiv
#   2306.15595) divides every frequency by `rope_factor`; `'llama3'` (Meta's Llama 3.1 recipe) divides
#   only the low frequencies, leaves high ones alone and blends in between.

# %%
#| export
def rope_frequencies(head_dim: int, theta: float = 10_000.0, scaling: str = 'none', factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_len: int = 8192) -> np.ndarray:
    "The `head_dim // 2` rotation frequencies $\\omega_i$ (radians per token), after scaling."
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling == 'none': pass
    elif scaling == 'linear': inv_freq = inv_freq / factor
    elif scaling == 'llama3':
        wavelen = 2 * np.pi / inv_freq
        low_wavelen, high_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
        smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen > low_wavelen, inv_freq / factor, np.where(wavelen < high_wavelen, inv_freq, blended)
        )
    else: raise ValueError(f"unknown rope scaling {scaling!r}; expected 'none', 'linear' or 'llama3'")
    return inv_freq.astype(np.float32)

@dataclass(frozen=True)
class Rope:
    "Rotary embedding for one head size, base and scaling; applies to `[batch, length, heads, head_dim]`."
    head_dim: int
    theta: float = 10_000.0
    scaling: str = 'none'
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Rope:
        return cls(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor, cfg.rope_low_freq_factor,
                   cfg.rope_high_freq_factor, cfg.rope_original_max_len)

    @property
    def frequencies(self) -> np.ndarray:
        return rope_frequencies(self.head_dim, self.theta, self.scaling, self.factor, self.low_freq_factor,
                                self.high_freq_factor, self.original_max_len)

    def sin_cos(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        "sin and cos of the angles, `[batch, length, head_dim]`, in float32."
        angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(self.frequencies)
        angles = jnp.concatenate([angles, angles], axis=-1)
        return jnp.sin(angles), jnp.cos(angles)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        "Rotate `x` (`[batch, length, heads, head_dim]`) by the angles of integer `positions` (`[batch, length]`)."
        sin, cos = self.sin_cos(positions)
        sin, cos = sin[:, :, None, :], cos[:, :, None, :]
        xf = x.astype(jnp.float32)
        x1, x2 = jnp.split(xf, 2, axis=-1)
        rotated = jnp.concatenate([-x2, x1], axis=-1)
        return (xf * cos + rotated * sin).astype(x.dtype)


# %% [markdown]
# The defining property: the dot product of a rotated query and key depends only on their distance.
# Shift both positions by the same amount and the score does not move:

# %%
rope = Rope(head_dim=8, theta=10_000.0)
q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))
def score(pq, pk): return float(jnp.sum(rope(q, jnp.array([[pq]])) * rope(k, jnp.array([[pk]]))))
[round(score(10 + s, 3 + s), 5) for s in (0, 100, 5000)]

# %%
test_close(score(10, 3), score(1010, 1003), eps=1e-3)
test_close(score(7, 7), float(jnp.sum(q * k)), eps=1e-5)   # distance 0: no rotation at all
test_close(jnp.linalg.norm(rope(q, jnp.array([[123]]))), jnp.linalg.norm(q), eps=1e-5)  # rotations keep norms

# %% [markdown]
# How the scalings move the frequencies, for a 128-wide head: linear interpolation divides all of them
# by the factor; `llama3` divides only those whose wavelength exceeds the original context and keeps
# the fast ones, which encode local word order, untouched.

# %%
base = rope_frequencies(128, 500_000.0)
lin = rope_frequencies(128, 500_000.0, 'linear', 8.0)
l3 = rope_frequencies(128, 500_000.0, 'llama3', 8.0, 1.0, 4.0, 8192)
for i in (0, 16, 32, 48, 63):
    print(f'i={i:2d}  wavelength {2 * np.pi / base[i]:>12,.0f} tokens   linear x{base[i] / lin[i]:.1f}   llama3 x{base[i] / l3[i]:.2f}')

# %%
test_close(base / lin, np.full(64, 8.0), eps=1e-4)
test_close(l3[0], base[0], eps=1e-9)          # high frequency: untouched
test_close(base[-1] / l3[-1], 8.0, eps=1e-4)  # low frequency: interpolated
test_fail(lambda: rope_frequencies(8, scaling='yarn'), contains='yarn')


# %% [markdown]
# ## SwiGLU MLP
#
# Llama's MLP is a gated linear unit with a SiLU gate (Shazeer, 2020, arXiv 2002.05202):
# $\mathrm{down}\big(\mathrm{silu}(x W_\text{gate}) \odot x W_\text{up}\big)$. The matmuls run in the
# compute dtype; the weights stay in the parameter dtype until the moment they are used.

# %%
#| export
class MLP(nnx.Module):
    "SwiGLU feed-forward block: `down(silu(x @ gate) * (x @ up))`."
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, dt, std = cfg.d_model, cfg.d_ff, cfg.param_jnp_dtype, cfg.init_std
        self.gate = logical_param(rngs.params(), (d, f), ('embed', 'mlp'), dt, std=std)
        self.up = logical_param(rngs.params(), (d, f), ('embed', 'mlp'), dt, std=std)
        self.down = logical_param(rngs.params(), (f, d), ('mlp', 'embed'), dt, std=std)
        self.compute_dtype = cfg.compute_jnp_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.compute_dtype
        x = x.astype(dt)
        h = jax.nn.silu(dense(x, self.gate[...].astype(dt))) * dense(x, self.up[...].astype(dt))
        h = constrain(h, ('batch', 'length', 'mlp'))
        return dense(h, self.down[...].astype(dt))


# %%
cfg = ModelConfig(d_model=16, d_ff=48)
mlp = MLP(cfg, rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.key(1), (2, 5, 16))
mlp(x).shape, {k: v.get_metadata()['out_sharding'] for k, v in nnx.state(mlp, nnx.Param).items()}

# %%
g, u, d = (np.asarray(mlp.gate[...]), np.asarray(mlp.up[...]), np.asarray(mlp.down[...]))
xn = np.asarray(x)
expected = ((xn @ g) / (1 + np.exp(-(xn @ g))) * (xn @ u)) @ d
test_close(mlp(x), expected, eps=1e-5)
test_eq(mlp(x).shape, (2, 5, 16))

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
