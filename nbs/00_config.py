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
# # Configs
#
# > Frozen config dataclasses with one JSON and override helper; model presets and Llama `config.json` interop.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/00_config.ipynb)

# %%
#| default_exp config

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
# Every stage of the pipeline starts from one object: a `ModelConfig`. It is a *frozen* dataclass
# for three reasons. It is hashable, so `jax.jit` can take it as a static argument and cache
# compiled programs by it. It cannot drift: a stage that needs a different model (a longer context,
# a larger RoPE base) makes a new config with `dataclasses.replace`, and the old one stays a
# faithful record of what was trained. And it validates itself once, at construction, so a bad
# value fails here with the field's name instead of deep inside a traced computation.
#
# The xGen-small report (arXiv 2505.06496) describes 4B and 9B Transformer decoders with 128K
# context, but does not publish their widths, depths, vocabulary or RoPE base. We use Llama-style
# blocks (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU), which is also the format of
# the released checkpoints (they load with stock `transformers` Llama classes), and choose shapes
# whose parameter counts land on 4B and 9B. Those choices are ours and are marked as such below.

# %%
#| export
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

# %%
from fastcore.test import test_close, test_eq, test_fail


# %%
#| export
class ConfigError(ValueError):
    "A configuration value is invalid; the message names the field."

DTYPES = ('float32', 'bfloat16', 'float16')
ROPE_SCALINGS = ('none', 'linear', 'llama3')
REMAT_POLICIES = ('none', 'full', 'dots')
ATTENTION_IMPLS = ('auto', 'xla', 'blockwise', 'flash', 'splash', 'seq_ring', 'seq_allgather')

def resolve_dtype(name: str):
    "The `jnp` dtype for `name`; `'auto'` means bfloat16 on TPU/GPU and float32 on CPU."
    import jax  # here, not at the top: the data modules' worker processes use `Config` without JAX
    import jax.numpy as jnp
    if name == 'auto': return jnp.dtype('bfloat16' if jax.default_backend() in ('tpu', 'gpu') else 'float32')
    if name not in DTYPES: raise ConfigError(f"unknown dtype {name!r}; expected one of {DTYPES + ('auto',)}")
    return jnp.dtype(name)


# %% [markdown]
# ## One way to read, write and override every config
#
# Every settings object in the package (the model, the mesh, a training run, a curation run, each
# post-training method, the whole pipeline) is a frozen dataclass that derives from `Config`, so all of
# them behave the same way: `to_dict` gives the JSON form that checkpoints and run directories store;
# `from_dict` rebuilds the object from it, nested configs included, and refuses a field the class does
# not have (a typo in a config file is an error naming the field, never a silently ignored key);
# `replace` is `dataclasses.replace` with the same check; and `with_overrides` applies the command
# line's dotted `field=value` pairs (`pretrain.schedule.0.peak_lr=1e-3`), each value read as the type of
# what it replaces. Field annotations drive the rebuilding: a field annotated with a config class, or
# with `tuple[SomeConfig, ...]`, is rebuilt as one; JSON's lists become tuples again, so a config read
# back equals (and hashes like) the one that was written.

# %%
#| export
def _deep_tuple(x):
    return tuple(_deep_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x

def _rebuild(hint, value, what: str):
    "`value` (JSON-shaped) as the annotated type `hint` wants it."
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type) and not isinstance(value, hint):
        return config_from_dict(hint, value, what)
    if (hint is tuple or typing.get_origin(hint) is tuple) and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
            return tuple(v if isinstance(v, args[0]) else config_from_dict(args[0], v, f'{what}.{i}')
                         for i, v in enumerate(value))
        return _deep_tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool): return float(value)
    return value

def config_from_dict(cls, d, what: str | None = None):
    "A `cls` dataclass from its dict form: nested configs rebuilt, unknown fields a `ConfigError` naming them."
    what = what or cls.__name__
    if not isinstance(d, dict): raise ConfigError(f"{what}: expected an object of {cls.__name__} fields, got {d!r}")
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(d) - set(fields))
    if unknown: raise ConfigError(f"{what}: {cls.__name__} has no field(s) {unknown}; its fields are {fields}")
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in d
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing: raise ConfigError(f"{what}: {cls.__name__} needs field(s) {missing}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _rebuild(hints.get(k), v, f'{what}.{k}') for k, v in d.items()})

def config_to_dict(cfg) -> dict:
    "The JSON form of a config dataclass (nested configs as dicts, tuples as lists, paths as strings)."
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))

def _typed(key: str, old, raw: str):
    "`raw` read as the type of the value it replaces (a list: comma-separated, typed by its first element)."
    try:
        if isinstance(old, bool):
            if raw.lower() not in ('1', '0', 'true', 'false'): raise ValueError(raw)
            return raw.lower() in ('1', 'true')
        if isinstance(old, dict):                           # a free-form mapping: give it as JSON
            v = json.loads(raw)
            if not isinstance(v, dict): raise ValueError(raw)
            return v
        if isinstance(old, list):
            kind = type(old[0]) if old else str
            return [_typed(key, kind(), x.strip()) for x in raw.split(',') if x.strip()]
        if old is None:                                     # an unset optional field: a JSON value, else the text
            try: return json.loads(raw)
            except json.JSONDecodeError: return raw
        return type(old)(raw)
    except ValueError: raise ConfigError(f"{key}: cannot read {raw!r} as {type(old).__name__}"
                                         + (' (give a JSON object)' if isinstance(old, dict) else '')) from None

def override_dict(d: dict, pairs) -> dict:
    "A copy of the config dict `d` with `['a.b=1', 'schedule.0.peak_lr=1e-3']` applied, typed by what they replace."
    d = json.loads(json.dumps(d))
    for pair in pairs:
        key, sep, raw = pair.partition('=')
        if not sep: raise ConfigError(f"override {pair!r} must look like field=value")
        *parents, leaf = key.split('.')
        node = d
        for p in parents:
            node = (node[int(p)] if isinstance(node, list) and p.isdigit() and int(p) < len(node) else
                    node.get(p) if isinstance(node, dict) else None)
            if node is None: raise ConfigError(f"no config field {key!r}")
        if isinstance(node, list) and leaf.isdigit() and int(leaf) < len(node):
            node[int(leaf)] = _typed(key, node[int(leaf)], raw)
        elif isinstance(node, dict) and leaf in node: node[leaf] = _typed(key, node[leaf], raw)
        else: raise ConfigError(f"no config field {key!r}")
    return d

class Config:
    "Base of every config dataclass: JSON round trips, unknown-field errors, validated copies, dotted overrides."
    def to_dict(self) -> dict: return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict, what: str | None = None): return config_from_dict(cls, d, what)

    @classmethod
    def load(cls, path):
        "Read a JSON config file (the CLI's `--config`); unknown fields are an error."
        try: d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e: raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))

    def replace(self, **changes):
        "A validated copy with `changes` applied (unknown field names raise)."
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown: raise ConfigError(f"{type(self).__name__} has no field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def with_overrides(self, pairs):
        "`['a.b=1', 'schedule.0.peak_lr=1e-3']` applied, each value typed by the field it replaces."
        return type(self).from_dict(override_dict(self.to_dict(), pairs))


# %% [markdown]
# A small example: a config holding another one and a tuple of a third.

# %%
@dataclass(frozen=True)
class _Phase(Config):
    name: str
    lr: float = 1e-3

@dataclass(frozen=True)
class _Run(Config):
    phases: tuple[_Phase, ...] = (_Phase('warmup'), _Phase('main', 3e-3))
    sizes: tuple = (1, (2, 3))
    note: str | None = None

run = _Run()
print(run.to_dict())
print(run.with_overrides(['phases.1.lr=1e-2', 'note=first try']))

# %%
test_eq(_Run.from_dict(run.to_dict()), run)
test_eq(hash(_Run.from_dict(json.loads(json.dumps(run.to_dict())))), hash(run))    # lists read back as tuples
test_eq(run.with_overrides(['phases.1.lr=1e-2']).phases[1], _Phase('main', 1e-2))
test_eq(run.with_overrides(['sizes=4,5']).sizes, (4, 5))
test_eq(run.with_overrides(['note=7']).note, 7)                                    # an unset field: read as JSON
test_fail(lambda: _Run.from_dict({'phase': []}), contains="has no field(s) ['phase']")
test_fail(lambda: _Run.from_dict({'phases': [{'name': 'a', 'lr': 1, 'lrr': 2}]}), contains='_Run.phases.0')
test_fail(lambda: run.with_overrides(['phases.2.lr=1']), contains="no config field 'phases.2.lr'")
test_fail(lambda: run.with_overrides(['phases.0.lr=fast']), contains="cannot read 'fast' as float")
test_fail(lambda: run.replace(phase=()), contains='phase')
test_eq(override_dict({'lengths': [512, 1024]}, ['lengths=256, 2048'])['lengths'], [256, 2048])
test_eq(override_dict({'shares': {}}, ['shares={"math": 2}'])['shares'], {'math': 2})
test_fail(lambda: override_dict({'shares': {}}, ['shares=math']), contains='give a JSON object')


# %% [markdown]
# ## The model config
#
# The fields are the usual Llama hyper-parameters, named for what they are. A few deserve a word:
#
# - `n_kv_heads` < `n_heads` gives **grouped-query attention**: each key/value head serves
#   `n_heads // n_kv_heads` query heads, which shrinks the KV cache by the same factor, the single
#   biggest lever on long-context decoding memory.
# - `rope_theta` and the `rope_*` scaling fields are *configuration*, not constants baked into the
#   layers, because length extension (notebook 20) changes exactly these between stages.
# - `param_dtype` is what the weights are stored in (float32 master weights for training);
#   `compute_dtype` is what the matmuls run in. `'auto'` picks bfloat16 on TPU/GPU and float32 on
#   CPU, where bfloat16 matmuls are emulated and slow.
# - `scan_layers` stacks the layers' weights on a leading `layers` axis and runs them with
#   `jax.lax.scan`: compile time stays flat in depth (36 layers compile as fast as 2). `remat`
#   trades recomputation for activation memory.

# %%
#| export
def _positive(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"{type(cfg).__name__}.{n} must be a positive number, got {v!r}")

@dataclass(frozen=True)
class ModelConfig(Config):
    "Shape and numerics of a Llama-style decoder. Validated at construction; immutable afterwards."
    vocab_size: int = 4096
    d_model: int = 128           # hidden size
    n_layers: int = 4
    n_heads: int = 4             # query heads
    n_kv_heads: int = 2          # key/value heads (GQA when < n_heads)
    head_dim: int = 32
    d_ff: int = 384              # SwiGLU hidden size
    max_seq_len: int = 512       # longest sequence the model accepts
    rope_theta: float = 10_000.0 # RoPE base
    rope_scaling: str = 'none'   # 'none' | 'linear' (position interpolation) | 'llama3'
    rope_factor: float = 1.0     # scaling factor for 'linear' and 'llama3'
    rope_low_freq_factor: float = 1.0   # 'llama3' only
    rope_high_freq_factor: float = 4.0  # 'llama3' only
    rope_original_max_len: int = 8192   # 'llama3' only: context length before scaling
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    param_dtype: str = 'float32'
    compute_dtype: str = 'auto'
    attention_impl: str = 'auto'
    attn_block_q: int = 512        # query block of the blockwise / flash / splash kernels
    attn_block_kv: int = 512       # key/value block
    scan_layers: bool = True
    remat: str = 'none'

    def __post_init__(self):
        ints = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff', 'max_seq_len',
                'rope_original_max_len', 'attn_block_q', 'attn_block_kv')
        for n in ints:
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"ModelConfig.{n} must be an int, got {v!r}")
        _positive(self, *ints, 'rope_theta', 'rope_factor', 'norm_eps', 'init_std',
                  'rope_low_freq_factor', 'rope_high_freq_factor')
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"ModelConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.param_dtype not in DTYPES:
            raise ConfigError(f"ModelConfig.param_dtype: unknown dtype {self.param_dtype!r}; expected one of {DTYPES}")
        if self.compute_dtype not in DTYPES + ('auto',):
            raise ConfigError(
                f"ModelConfig.compute_dtype: unknown dtype {self.compute_dtype!r}; expected one of {DTYPES + ('auto',)}"
            )
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ConfigError(f"ModelConfig.rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        if self.rope_scaling == 'llama3' and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError("ModelConfig.rope_high_freq_factor must exceed rope_low_freq_factor for 'llama3' scaling")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"ModelConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )
        for n in ('tie_embeddings', 'scan_layers'):
            if not isinstance(getattr(self, n), bool):
                raise ConfigError(f"ModelConfig.{n} must be a bool, got {getattr(self, n)!r}")

    @property
    def q_per_kv(self) -> int: return self.n_heads // self.n_kv_heads
    @property
    def param_jnp_dtype(self): return resolve_dtype(self.param_dtype)
    @property
    def compute_jnp_dtype(self): return resolve_dtype(self.compute_dtype)

    @classmethod
    def from_hf(cls, src, **overrides) -> ModelConfig:
        "From a Llama-format `config.json` (dict, file or checkpoint directory); see `config_from_hf`."
        return config_from_hf(src, **overrides)
    def to_hf(self, **extra) -> dict:
        "A Llama-format `config.json` dict; see `config_to_hf`."
        return config_to_hf(self, **extra)


# %% [markdown]
# A config that makes no sense fails at once, naming the field:

# %%
try: ModelConfig(n_heads=6, n_kv_heads=4)
except ConfigError as e: print(e)
try: ModelConfig(head_dim=33)
except ConfigError as e: print(e)

# %%
test_fail(lambda: ModelConfig(n_heads=6, n_kv_heads=4), contains='n_kv_heads')
test_fail(lambda: ModelConfig(head_dim=33), contains='head_dim')
test_fail(lambda: ModelConfig(d_model=0), contains='d_model')
test_fail(lambda: ModelConfig(n_layers=-2), contains='n_layers')
test_fail(lambda: ModelConfig(vocab_size=100.5), contains='vocab_size')
test_fail(lambda: ModelConfig(param_dtype='float8'), contains='param_dtype')
test_fail(lambda: ModelConfig(compute_dtype='int4'), contains='compute_dtype')
test_fail(lambda: ModelConfig(rope_scaling='yarn'), contains='rope_scaling')
test_fail(lambda: ModelConfig(rope_theta=0.0), contains='rope_theta')
test_fail(lambda: ModelConfig(remat='sometimes'), contains='remat')
test_fail(lambda: ModelConfig().replace(width=3), contains='width')
test_eq(ModelConfig().replace(rope_theta=5e5).rope_theta, 5e5)
test_eq(ModelConfig.from_dict(ModelConfig().to_dict()), ModelConfig())
test_eq(hash(ModelConfig()), hash(ModelConfig()))  # hashable: usable as a static jit argument


# %% [markdown]
# ## Counting parameters in closed form
#
# A Llama block has four attention projections and three MLP matrices, plus two RMSNorm scales:
#
# $$P_\text{block} = \underbrace{d\,(H + 2K)\,h + H h\,d}_{\text{q, k, v, o}} + \underbrace{3\,d\,f}_{\text{gate, up, down}} + \underbrace{2d}_{\text{norms}}$$
#
# with width $d$, $H$ query heads, $K$ key/value heads of size $h$, and MLP width $f$. The model adds
# the embedding $V d$, a final norm $d$ and, unless tied to the embedding, an output head $V d$.
# We check this formula against the real parameter tree in notebook 12 (via `jax.eval_shape`, so
# even the 9B model is counted without allocating a byte).

# %%
#| export
def param_counts(cfg: ModelConfig) -> dict:
    "Closed-form parameter counts of a decoder with config `cfg`, by part."
    d, H, K, h, f, V, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    attn = d * (H + 2 * K) * h + H * h * d
    mlp = 3 * d * f
    counts = dict(embedding=V * d, attention=L * attn, mlp=L * mlp, norms=L * 2 * d + d,
                  lm_head=0 if cfg.tie_embeddings else V * d)
    counts['total'] = sum(counts.values())
    counts['non_embedding'] = counts['total'] - counts['embedding'] - counts['lm_head']
    return counts

def num_params(cfg: ModelConfig) -> int:
    "Total number of parameters of a decoder with config `cfg`."
    return param_counts(cfg)['total']


# %% [markdown]
# ## Presets
#
# - `tiny` trains on a 2-core CPU in minutes (about 1.8M parameters), and is what every notebook,
#   test and the end-to-end pipeline use.
# - `xgen_4b` and `xgen_9b` are **our** Llama-style shapes for the report's two sizes: 128-wide heads,
#   8 KV heads, a 131,072-entry vocabulary (2^17, a multiple of every TPU tile size), untied
#   embeddings. The 9B uses the familiar 4096/14336 width of 8B-class Llamas with 36 layers.
#   `max_seq_len` and `rope_theta` are the *pre-training* values; the length-extension stages raise
#   both (notebook 20) on the way to 128K.

# %%
#| export
PRESETS: dict[str, ModelConfig] = {
    'tiny': ModelConfig(),
    'xgen_4b': ModelConfig(vocab_size=131_072, d_model=3072, n_layers=32, n_heads=24, n_kv_heads=8, head_dim=128,
                           d_ff=8192, max_seq_len=8192, rope_theta=500_000.0, norm_eps=1e-5, param_dtype='float32'),
    'xgen_9b': ModelConfig(vocab_size=131_072, d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128,
                           d_ff=14_336, max_seq_len=8192, rope_theta=500_000.0, norm_eps=1e-5, param_dtype='float32'),
}

def get_preset(name: str, **overrides) -> ModelConfig:
    "The preset config `name`, with `overrides` applied."
    if name not in PRESETS: raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


# %%
counts = {name: param_counts(c) for name, c in PRESETS.items()}
print(f"{'parameters':>14}" + ''.join(f'{name:>16}' for name in counts))
for part in counts['tiny']: print(f'{part:>14}' + ''.join(f'{c[part]:>16,}' for c in counts.values()))

# %%
test_close(num_params(PRESETS['xgen_4b']) / 4e9, 1.0, eps=0.05)
test_close(num_params(PRESETS['xgen_9b']) / 9e9, 1.0, eps=0.05)
test_eq(param_counts(get_preset('tiny', tie_embeddings=True))['lm_head'], 0)
test_fail(lambda: get_preset('xgen_70b'), contains='xgen_70b')


# %% [markdown]
# ## Llama `config.json` interop
#
# Hugging Face stores a Llama model's shape in `config.json`. Reading it lets us load released
# checkpoints (notebook 17); writing it makes our checkpoints loadable by `transformers`. Two
# generations of the format exist: `transformers` 4 writes `rope_theta` and `rope_scaling` at the
# top level, `transformers` 5 nests both in `rope_parameters`. We read both and write the older
# one, which both generations understand.
#
# Anything our decoder cannot represent (biases, another activation, another architecture,
# YaRN-style RoPE scaling) is refused with the offending key, never silently dropped.

# %%
#| export
def _load_json(src) -> dict:
    if isinstance(src, dict): return src
    p = Path(src)
    if p.is_dir(): p = p / 'config.json'
    if not p.exists(): raise FileNotFoundError(f"no config.json at {p}")
    return json.loads(p.read_text())

def _rope_from_hf(hf: dict) -> dict:
    params = hf.get('rope_parameters')  # transformers >= 5 nests theta and scaling here
    if params is None:                  # transformers 4: top-level theta, optional rope_scaling
        params = dict(hf.get('rope_scaling') or {}, rope_theta=hf.get('rope_theta', 10_000.0))
    theta = params.get('rope_theta', hf.get('rope_theta', 10_000.0))
    kind = params.get('rope_type') or params.get('type') or 'default'
    out = dict(rope_theta=float(theta))
    if kind == 'default': return out
    if kind == 'linear': return dict(out, rope_scaling='linear', rope_factor=float(params['factor']))
    if kind == 'llama3':
        return dict(out, rope_scaling='llama3', rope_factor=float(params['factor']),
                    rope_low_freq_factor=float(params['low_freq_factor']),
                    rope_high_freq_factor=float(params['high_freq_factor']),
                    rope_original_max_len=int(params['original_max_position_embeddings']))
    raise ConfigError(f"config.json: unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")

def config_from_hf(src, **overrides) -> ModelConfig:
    "A `ModelConfig` from a Llama-format `config.json` (a dict, a file, or a checkpoint directory)."
    hf = _load_json(src)
    arch = hf.get('architectures') or []
    if hf.get('model_type', 'llama') != 'llama' and 'LlamaForCausalLM' not in arch:
        raise ConfigError(f"config.json: model_type {hf.get('model_type')!r} is not a Llama-format decoder")
    if hf.get('hidden_act', 'silu') != 'silu':
        raise ConfigError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses 'silu')")
    for key in ('attention_bias', 'mlp_bias'):
        if hf.get(key): raise ConfigError(f"config.json: {key}=true is not supported (our decoder has no biases)")
    if hf.get('pretraining_tp', 1) != 1: raise ConfigError("config.json: pretraining_tp != 1 is not supported")
    n_heads = hf['num_attention_heads']
    fields = dict(
        vocab_size=hf['vocab_size'],
        d_model=hf['hidden_size'],
        n_layers=hf['num_hidden_layers'],
        n_heads=n_heads,
        n_kv_heads=hf.get('num_key_value_heads') or n_heads,
        head_dim=hf.get('head_dim') or hf['hidden_size'] // n_heads,
        d_ff=hf['intermediate_size'],
        max_seq_len=hf.get('max_position_embeddings', 2048),
        norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
        init_std=float(hf.get('initializer_range', 0.02)),
        **_rope_from_hf(hf),
    )
    return ModelConfig(**{**fields, **overrides})

def config_to_hf(cfg: ModelConfig, **extra) -> dict:
    "A Llama-format `config.json` dict for `cfg` (`extra` adds keys such as `bos_token_id`)."
    hf = dict(architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=cfg.vocab_size,
              hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
              hidden_act='silu', max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
              rope_theta=cfg.rope_theta, rope_scaling=None, tie_word_embeddings=cfg.tie_embeddings,
              attention_bias=False, mlp_bias=False, initializer_range=cfg.init_std, torch_dtype=cfg.param_dtype)
    if cfg.rope_scaling == 'linear': hf['rope_scaling'] = dict(rope_type='linear', factor=cfg.rope_factor)
    if cfg.rope_scaling == 'llama3':
        hf['rope_scaling'] = dict(rope_type='llama3', factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                                  high_freq_factor=cfg.rope_high_freq_factor,
                                  original_max_position_embeddings=cfg.rope_original_max_len)
    return {**hf, **extra}


# %% [markdown]
# A `transformers`-5 style config (RoPE nested in `rope_parameters`) and the older top-level style
# read to the same `ModelConfig`, and `to_hf` round-trips:

# %%
hf5 = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': 1000, 'hidden_size': 64,
       'intermediate_size': 160, 'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
       'max_position_embeddings': 4096, 'rms_norm_eps': 1e-6, 'tie_word_embeddings': True,
       'rope_parameters': {'rope_type': 'linear', 'factor': 4.0, 'rope_theta': 50_000.0}}
hf4 = {k: v for k, v in hf5.items() if k != 'rope_parameters'} | {'rope_theta': 50_000.0, 'rope_scaling': {'type': 'linear', 'factor': 4.0}}
cfg = ModelConfig.from_hf(hf5)
cfg

# %%
test_eq(ModelConfig.from_hf(hf4), cfg)
test_eq(cfg.head_dim, 16)
test_eq(ModelConfig.from_hf(cfg.to_hf()), cfg)
for name, c in PRESETS.items(): test_eq(ModelConfig.from_hf(c.to_hf()), c)
l3 = PRESETS['tiny'].replace(rope_scaling='llama3', rope_factor=8.0, rope_original_max_len=128)
test_eq(ModelConfig.from_hf(l3.to_hf()), l3)
test_fail(lambda: ModelConfig.from_hf(hf5 | {'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0}}), contains='yarn')
test_fail(lambda: ModelConfig.from_hf(hf5 | {'attention_bias': True}), contains='attention_bias')
test_fail(lambda: ModelConfig.from_hf(hf5 | {'hidden_act': 'gelu'}), contains='gelu')
test_fail(lambda: ModelConfig.from_hf(hf5 | {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel']}), contains='gpt2')
test_fail(lambda: ModelConfig.from_hf(hf5 | {'num_key_value_heads': 3}), contains='n_kv_heads')

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
