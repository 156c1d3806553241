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
# # Hugging Face interop
#
# > Llama-format safetensors checkpoints in and out, loadable by `transformers`.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/16_hf.ipynb)

# %%
#| default_exp hf

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

import json
import math
import struct
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from xgen_small.config import ModelConfig
from xgen_small.model import Decoder, abstract_model

# %%
from fastcore.test import test_eq, test_close, test_fail
import tempfile
from xgen_small.config import get_preset

# %% [markdown]
# The released xGen-small checkpoints are Llama-format: a `config.json` (read by
# `ModelConfig.from_hf`, notebook 00) and weights in one or more `safetensors` files. This notebook
# maps those tensors onto our parameters and back. `tests/test_hf_parity.py` holds the proof that
# it is right: for several configurations (multi-head and grouped-query attention, tied embeddings,
# RoPE scaling), a randomly initialised `transformers.LlamaForCausalLM` and our decoder loaded from
# its checkpoint agree on the logits to within 1e-4, and our export loads back into `transformers`.
#
# To load the released model on Colab (after downloading its directory from the hub yourself):
#
# ```python
# model = load_hf_checkpoint('xgen-small-9B-instruct-r', param_dtype='bfloat16')
# ```

# %% [markdown]
# ## The safetensors format
#
# A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor's
# name to its dtype, shape and byte range, then the raw bytes. That is simple enough to read
# ourselves, and doing so buys two things: tensors are **memory-mapped** (a 18 GB checkpoint is not
# read into RAM before we need each piece), and **bfloat16** comes back as a NumPy array (through
# `ml_dtypes`, which JAX already depends on) rather than being refused by NumPy or eagerly copied
# onto an accelerator.

# %%
#| export
_ST_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
              'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}

def read_safetensors(path) -> dict[str, np.ndarray]:
    "Memory-mapped, read-only arrays of every tensor in safetensors file `path`."
    path = Path(path)
    size = path.stat().st_size
    with open(path, 'rb') as f:
        head = f.read(8)
        if len(head) < 8: raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack('<Q', head)
        if n > size - 8: raise ValueError(f"{path}: corrupt safetensors header (length {n} > file size {size})")
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == '__metadata__': continue
        if info['dtype'] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype, (begin, end) = np.dtype(_ST_DTYPES[info['dtype']]), info['data_offsets']
        if end - begin != math.prod(info['shape']) * dtype.itemsize or end > data.size:
            raise ValueError(
                f"{path}: tensor {name!r} byte range {begin}:{end} does not match shape {info['shape']} "
                f"({info['dtype']})"
            )
        out[name] = data[begin:end].view(dtype).reshape(info['shape'])
    return out

def write_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None):
    "Write `tensors` (name -> array) to `path` in the safetensors format."
    header, offset = {}, 0
    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    for name, a in arrays.items():
        if a.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        header[name] = dict(dtype=_ST_NAMES[a.dtype], shape=list(a.shape), data_offsets=[offset, offset + a.nbytes])
        offset += a.nbytes
    if metadata: header['__metadata__'] = metadata
    blob = json.dumps(header, separators=(',', ':')).encode()
    blob += b' ' * (-len(blob) % 8)                     # keep the data 8-byte aligned, as the reference writer does
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(blob))); f.write(blob)
        for a in arrays.values(): f.write(a.tobytes())


# %%
tmp = Path(tempfile.mkdtemp())
ts = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.array([1.5, -2.25], dtype=ml_dtypes.bfloat16)}
write_safetensors(tmp / 'x.safetensors', ts, {'format': 'pt'})
back = read_safetensors(tmp / 'x.safetensors')
{k: (v.dtype, v.shape, v.tolist()) for k, v in back.items()}

# %%
for k in ts: test_eq(back[k].dtype, ts[k].dtype); test_eq(back[k].tolist(), ts[k].tolist())
(tmp / 'bad.safetensors').write_bytes(b'\x10\x00')
test_fail(lambda: read_safetensors(tmp / 'bad.safetensors'), contains='not a safetensors file')


# %% [markdown]
# ## The name map
#
# Hugging Face stores one matrix per layer as `[out_features, in_features]` (PyTorch's `Linear`
# convention), with the heads flattened into the output dimension. We store all layers stacked,
# `[in, heads, head_dim]` for the projections. So a query projection converts as
# `q[i] = W.T.reshape(d, H, h)`, and back as `q[i].reshape(d, H * h).T`. Norm scales and the
# embedding table need no change. Since both sides use the "rotate half" RoPE layout, no channel
# permutation is needed (checkpoints converted from Meta's original format already carry it).

# %%
#| export
def _layer_map(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], Callable, Callable]]:
    "Per-layer HF tensor suffix -> (our path below `layers`, hf->ours, ours->hf)."
    d, H, K, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    same = lambda w: w
    t = lambda w: w.T
    return {
        'input_layernorm.weight': (('attn_norm', 'scale'), same, same),
        'post_attention_layernorm.weight': (('mlp_norm', 'scale'), same, same),
        'self_attn.q_proj.weight': (('attn', 'q'), lambda w: w.T.reshape(d, H, h), lambda p: p.reshape(d, H * h).T),
        'self_attn.k_proj.weight': (('attn', 'k'), lambda w: w.T.reshape(d, K, h), lambda p: p.reshape(d, K * h).T),
        'self_attn.v_proj.weight': (('attn', 'v'), lambda w: w.T.reshape(d, K, h), lambda p: p.reshape(d, K * h).T),
        'self_attn.o_proj.weight': (('attn', 'o'), lambda w: w.T.reshape(H, h, d), lambda p: p.reshape(H * h, d).T),
        'mlp.gate_proj.weight': (('mlp', 'gate'), t, t),
        'mlp.up_proj.weight': (('mlp', 'up'), t, t),
        'mlp.down_proj.weight': (('mlp', 'down'), t, t),
    }

def _top_map(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], Callable, Callable]]:
    top = {'model.embed_tokens.weight': (('embed',), lambda w: w, lambda p: p),
           'model.norm.weight': (('final_norm', 'scale'), lambda w: w, lambda p: p)}
    if not cfg.tie_embeddings: top['lm_head.weight'] = (('lm_head',), lambda w: w.T, lambda p: p.T)
    return top

def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    "The name and shape of every tensor a Llama-format checkpoint of `cfg` must contain."
    flat = {path: v.shape for path, v in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))}
    shape_of = lambda fn, shape: jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, jnp.float32)).shape
    out = {name: shape_of(to_hf, flat[path]) for name, (path, _, to_hf) in _top_map(cfg).items()}
    for suffix, (path, _, to_hf) in _layer_map(cfg).items():
        shape = shape_of(to_hf, flat[('layers', *path)][1:])
        out.update({f'model.layers.{i}.{suffix}': shape for i in range(cfg.n_layers)})
    return out


# %%
expected_hf_shapes(get_preset('tiny', n_layers=1))


# %% [markdown]
# ## Import
#
# `state_from_hf` checks the tensors against what the config promises *before* converting anything:
# missing tensors, unexpected ones (a bias, say, means the checkpoint is not the architecture we
# implement) and wrong shapes are each reported by name. Only `rotary_emb.inv_freq` buffers, which
# some exporters save and which we recompute from the config, are ignored, as is a redundant
# `lm_head.weight` in a tied checkpoint. The model is then built with `nnx.eval_shape` and filled
# with the converted arrays: random initialisation never runs, so loading a 9B model needs the
# memory of one copy of the weights, not two.

# %%
#| export
class CheckpointError(ValueError):
    "A checkpoint does not match the configuration it claims to have."

def _ignorable(name: str, cfg: ModelConfig) -> bool:
    return name.endswith('rotary_emb.inv_freq') or (cfg.tie_embeddings and name == 'lm_head.weight')

def _check_tensors(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]):
    expected = expected_hf_shapes(cfg)
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected and not _ignorable(n, cfg)]
    wrong = [f'{n}: checkpoint has {tuple(tensors[n].shape)}, config.json implies {expected[n]}'
             for n in expected if n in tensors and tuple(tensors[n].shape) != tuple(expected[n])]
    problems = []
    if missing: problems.append(f"{len(missing)} missing tensor(s): {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) (not a plain Llama decoder?): {unexpected[:6]}")
    if wrong: problems.append(f"{len(wrong)} shape mismatch(es): " + '; '.join(wrong[:4]))
    if problems: raise CheckpointError('checkpoint does not match its config: ' + ' | '.join(problems))

def state_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
    "Our parameters (flat path -> array in `cfg.param_dtype`) from HF-named `tensors`."
    return {path: read((slice(None),) * len(shape)) for path, (shape, read) in lazy_state_from_hf(cfg, tensors).items()}

def model_from_state(cfg: ModelConfig, params: Mapping[tuple[str, ...], np.ndarray]) -> Decoder:
    "A `Decoder` holding `params` (flat path -> array), built without running the initialisers."
    graphdef, abstract = nnx.split(abstract_model(cfg))
    flat = [(path, var.replace(jnp.asarray(params[path]))) for path, var in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))

def _weight_files(path: Path) -> list[Path]:
    index = path / 'model.safetensors.index.json'
    if index.exists(): return [path / f for f in sorted(set(json.loads(index.read_text())['weight_map'].values()))]
    if (path / 'model.safetensors').exists(): return [path / 'model.safetensors']
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")

def lazy_state_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[tuple[str, ...], tuple]:
    """Our parameters as `(shape, read)` pairs: `read(index)` returns the part of the parameter at a tuple of slices,
    in `cfg.param_dtype`, reading only that part of the (memory-mapped) checkpoint tensors. The layout changes of
    the name map are numpy views (transposes and reshapes that split an axis), so slicing them reads just the
    bytes of the slice."""
    _check_tensors(cfg, tensors)
    dt = np.dtype(cfg.param_jnp_dtype)
    out = {}
    for name, (path, fn, _) in _top_map(cfg).items():
        view = fn(tensors[name])
        out[path] = (view.shape, lambda idx, view=view: np.asarray(view[idx], dt))
    for suffix, (path, fn, _) in _layer_map(cfg).items():
        names = [f'model.layers.{i}.{suffix}' for i in range(cfg.n_layers)]
        one = fn(tensors[names[0]]).shape
        def read(idx, names=names, fn=fn):
            layers = range(cfg.n_layers)[idx[0]]
            return np.stack([np.asarray(fn(tensors[names[i]])[idx[1:]], dt) for i in layers])
        out[('layers', *path)] = ((cfg.n_layers, *one), read)
    return out

def load_hf_checkpoint(path, *, mesh=None, rules=None, **config_overrides) -> Decoder:
    """A `Decoder` from a Llama-format checkpoint directory (`config.json` + safetensors); overrides apply to the
    config. With `mesh` (and the logical-axis `rules` of notebook 13, by default its defaults), every parameter is built
    directly in its shards: each device's part is read from the memory-mapped files and converted on its own, so no
    full copy of the model is ever made on the host or on any device."""
    path = Path(path)
    cfg = ModelConfig.from_hf(path, **config_overrides)
    tensors = {}
    for f in _weight_files(path): tensors.update(read_safetensors(f))
    if mesh is None: return model_from_state(cfg, state_from_hf(cfg, tensors))
    from xgen_small.sharding import DEFAULT_RULES, check_divisible, param_specs
    lazy = lazy_state_from_hf(cfg, tensors)
    graphdef, abstract = nnx.split(abstract_model(cfg))
    specs = dict(nnx.to_flat_state(param_specs(abstract_model(cfg), rules or DEFAULT_RULES)))
    flat = []
    for p, var in nnx.to_flat_state(abstract):
        shape, read = lazy[p]
        spec = specs[p].get_value() if hasattr(specs[p], 'get_value') else specs[p]
        check_divisible(p, shape, spec, mesh)
        arr = jax.make_array_from_callback(shape, NamedSharding(mesh, spec), read)
        flat.append((p, var.replace(arr)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# %% [markdown]
# ## Export
#
# The reverse map, plus a `config.json`. Large models are split into shards of at most
# `max_shard_bytes` with a `model.safetensors.index.json`, as `transformers` expects.

# %%
#| export
def state_to_hf(model: Decoder, dtype=None) -> dict[str, np.ndarray]:
    "HF-named tensors (`[out, in]` matrices, one per layer) of `model`, cast to `dtype` if given."
    cfg = model.cfg
    flat = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    cast = (lambda a: np.ascontiguousarray(a, dtype)) if dtype is not None else np.ascontiguousarray
    out = {name: cast(fn(flat[path])) for name, (path, _, fn) in _top_map(cfg).items()}
    for i in range(cfg.n_layers):
        for suffix, (path, _, fn) in _layer_map(cfg).items():
            out[f'model.layers.{i}.{suffix}'] = cast(fn(flat[('layers', *path)][i]))
    return out

def save_hf_checkpoint(model: Decoder, path, *, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30,
                       **config_extra) -> Path:
    "Write `model` as a Llama-format checkpoint directory loadable by `transformers`; returns the directory."
    path = Path(path); path.mkdir(parents=True, exist_ok=True)
    np_dtype = None if dtype is None else np.dtype(ml_dtypes.bfloat16 if dtype == 'bfloat16' else dtype)
    tensors = state_to_hf(model, np_dtype)
    cfg_json = model.cfg.to_hf(**config_extra)
    if dtype is not None: cfg_json['torch_dtype'] = dtype
    (path / 'config.json').write_text(json.dumps(cfg_json, indent=2))
    shards, current, size = [], {}, 0
    for name, a in tensors.items():
        if current and size + a.nbytes > max_shard_bytes: shards.append(current); current, size = {}, 0
        current[name] = a; size += a.nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(path / 'model.safetensors', shards[0], {'format': 'pt'}); return path
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
        write_safetensors(path / fname, shard, {'format': 'pt'})
        weight_map.update(dict.fromkeys(shard, fname))
    index = dict(metadata=dict(total_size=sum(a.nbytes for a in tensors.values())), weight_map=weight_map)
    (path / 'model.safetensors.index.json').write_text(json.dumps(index, indent=2))
    return path


# %% [markdown]
# A round trip through the Llama format, sharded into several files, gives back the same model:

# %%
cfg = get_preset('tiny')
model = Decoder(cfg, rngs=nnx.Rngs(0))
out_dir = save_hf_checkpoint(model, tmp / 'tiny-hf', max_shard_bytes=2**21)
sorted(p.name for p in out_dir.iterdir())

# %%
reloaded = load_hf_checkpoint(out_dir)
tokens = jnp.arange(12)[None] % cfg.vocab_size
test_eq(reloaded.cfg, cfg)
test_close(reloaded(tokens), model(tokens), eps=1e-6)
# bfloat16 export halves the files; loading converts back to the configured param dtype
bf = load_hf_checkpoint(save_hf_checkpoint(model, tmp / 'tiny-bf16', dtype='bfloat16'))
test_eq(bf.embed[...].dtype, jnp.float32)
test_close(bf(tokens), model(tokens), eps=0.05)

# %% [markdown]
# ## Straight onto a mesh
#
# A 9B checkpoint in bfloat16 is 18 GB; building it on the host in float32 and then splitting it over the devices
# would need several times that. With `mesh=`, `load_hf_checkpoint` builds every parameter in its shards
# (`jax.make_array_from_callback`): each device asks for its part, given as slices of our layout, and gets exactly
# those bytes read from the memory-mapped safetensors files, converted to the configured dtype. The name map's layout
# changes are numpy views (a transpose, and a reshape that splits the heads out of an axis), so slicing them reads
# nothing else. Host memory then stays at about one shard of one parameter, on any mesh the rules of notebook 13
# fit. On the devices this notebook sees:

# %%
from xgen_small.sharding import MeshConfig, make_mesh
mesh = make_mesh(MeshConfig(fsdp=-1))
sharded = load_hf_checkpoint(out_dir, mesh=mesh)
up = sharded.layers.mlp.up.get_value()
print(f'{dict(mesh.shape)}: layers.mlp.up {up.shape} as {up.sharding.spec}, {up.addressable_shards[0].data.shape} on '
      f'each device')

# %%
test_close(jax.jit(lambda m, t: m(t))(sharded, tokens), model(tokens), eps=1e-5)
test_eq(up.addressable_shards[0].data.shape[1], cfg.d_model // mesh.shape['fsdp'])
tensors = {name: a for f in _weight_files(out_dir) for name, a in read_safetensors(f).items()}
for suffix, (_, to_ours, _) in _layer_map(cfg).items():              # views: no copy of the mapped file
    test_eq(np.shares_memory(to_ours(tensors[f'model.layers.0.{suffix}']), tensors[f'model.layers.0.{suffix}']), True)

# %% [markdown]
# ## Bad checkpoints
#
# A checkpoint that does not match its config is refused with every problem named:

# %%
good = {name: a for f in _weight_files(out_dir) for name, a in read_safetensors(f).items()}
cases = {
    'missing': {k: v for k, v in good.items() if k != 'model.layers.2.mlp.up_proj.weight'},
    'unexpected': good | {'model.layers.0.self_attn.q_proj.bias': np.zeros(128, np.float32)},
    'wrong shape': good | {'model.norm.weight': np.zeros(64, np.float32)},
}
for name, tensors in cases.items():
    try: state_from_hf(cfg, tensors)
    except CheckpointError as e: print(f'{name:12}', e)

# %%
test_fail(lambda: state_from_hf(cfg, cases['missing']), contains='model.layers.2.mlp.up_proj.weight')
test_fail(lambda: state_from_hf(cfg, cases['unexpected']), contains='q_proj.bias')
test_fail(lambda: state_from_hf(cfg, cases['wrong shape']), contains='model.norm.weight')
test_fail(lambda: load_hf_checkpoint(tmp), contains='config.json')
test_eq(len(state_from_hf(cfg, good | {'model.rotary_emb.inv_freq': np.zeros(16, np.float32)})), 12)  # ignorable buffer

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
