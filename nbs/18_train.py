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
# # Training
#
# > The training loop every stage uses: sharded steps for any loss, checkpoints, exact resume, live metrics.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/18_train.ipynb)

# %%
#| default_exp train

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from xgen_small.checkpoint import Checkpointer
from xgen_small.config import Config, ConfigError, ModelConfig, get_preset, param_counts
from xgen_small.data.loader import Loader, LoaderConfig, LoaderState, TokenStore
from xgen_small.model import Decoder, abstract_model, params_of
from xgen_small.schedules import LRPhase, default_schedule, multi_phase_schedule, phase_at, total_steps
from xgen_small.seqpar import zigzag_order
from xgen_small.sharding import MeshConfig, logical_spec, make_mesh

# %%
from fastcore.test import test_eq, test_close, test_fail
import gzip, shutil, tempfile
from xgen_small.config import num_params
from xgen_small.data.curate import CurateConfig, curate
from xgen_small.data.loader import build_token_store
from xgen_small.data.sample import sample_shards
from xgen_small.tokenizer import Tokenizer, train_tokenizer

# %% [markdown]
# ## Configuration
#
# A `TrainConfig` holds everything a run needs besides its data: the model, the mesh, batch shape,
# the multi-phase schedule (notebook 09), the optimizer's constants, and checkpointing. It is frozen
# and serialisable to JSON, so a run's config is saved beside its checkpoints and `xgen-small pretrain`
# reads the same format, with `--set field=value` overrides (`model.d_model=256`, `batch_size=16`).

# %%
#| export
@dataclass(frozen=True)
class TrainConfig(Config):
    "Everything about a training run except its data."
    model: ModelConfig = field(default_factory=lambda: get_preset('tiny'))
    mesh: MeshConfig = field(default_factory=MeshConfig)
    seq_len: int = 256
    batch_size: int = 8                  # global rows per step
    grad_accum: int = 1                  # micro-batches per step (batch_size must divide by it)
    schedule: tuple[LRPhase, ...] = field(default_factory=lambda: default_schedule(200))
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    z_loss: float = 0.0                  # weight of the log-partition penalty (PaLM uses 1e-4)
    seed: int = 0
    log_every: int = 10
    save_every: int = 50
    keep: int = 3
    balance_sequence: bool = True        # zigzag the length axis when it is sharded (notebook 14)
    split: str = 'fill'  # packing: 'fill' rows completely, or 'boundary' (documents start rows; notebook 08)

    def __post_init__(self):
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"TrainConfig.batch_size ({self.batch_size}) must divide by grad_accum ({self.grad_accum})"
            )
        if self.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"TrainConfig.seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        for n in ('seq_len', 'batch_size', 'grad_accum', 'log_every', 'save_every', 'keep'):
            if getattr(self, n) < 1: raise ConfigError(f"TrainConfig.{n} must be positive")
        if not self.schedule: raise ConfigError("TrainConfig.schedule needs at least one phase")
        if self.split not in ('fill', 'boundary'):
            raise ConfigError(f"TrainConfig.split must be 'fill' or 'boundary', got {self.split!r}")

    @property
    def steps(self) -> int: return total_steps(self.schedule)

# %%
cfg = TrainConfig()
test_eq(TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))), cfg)
test_eq(cfg.with_overrides(['model.d_model=256', 'batch_size=16', 'schedule.1.final_lr=0']).model.d_model, 256)
test_fail(lambda: cfg.with_overrides(['model.width=3']), contains="no config field 'model.width'")
test_fail(lambda: cfg.with_overrides(['schedule.7.steps=3']), contains="no config field 'schedule.7.steps'")
test_fail(lambda: cfg.with_overrides(['balance_sequence=maybe']), contains="cannot read 'maybe' as bool")
test_fail(lambda: TrainConfig(batch_size=6, grad_accum=4), contains='grad_accum')
test_fail(lambda: TrainConfig(seq_len=4096), contains='max_seq_len')

# %% [markdown]
# ## Optimizer and loss
#
# AdamW (Loshchilov & Hutter, 2019) with the schedule as its learning rate, after clipping the
# gradient's global norm. Weight decay pulls weights toward zero, which regularises matrices but
# makes no sense for normalisation gains (it would shrink them toward zero, not toward their natural
# value of one): the decay mask skips every RMSNorm scale, and would skip biases, which this model
# does not have.
#
# The loss is next-token cross-entropy over the positions the loader marks (`loss_mask`), averaged per
# token. The optional **z-loss** (PaLM, Chowdhery et al., 2022) adds $\lambda \log^2 Z$, keeping the
# softmax's normaliser near one, which stabilises long bfloat16 runs. With gradient accumulation the
# micro-batches' *sums* are added and divided once by the total token count, so accumulating is
# exactly a larger batch (up to float rounding), however the loss mask falls.

# %%
#| export
def decay_mask(params) -> dict:
    "True for every parameter that gets weight decay: all but norm scales (and biases, had we any)."
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], 'key', None) not in ('scale', 'bias'), params
    )

def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(multi_phase_schedule(cfg.schedule), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                   weight_decay=cfg.weight_decay, mask=decay_mask))

def token_losses(logits, targets, mask, z_loss: float = 0.0):
    "(sum of cross-entropy, sum of z-loss, token count) over the masked positions, all float32."
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    ce = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(ce * mask), z_loss * jnp.sum(jnp.square(lse) * mask), jnp.sum(mask)

# %%
logits = jnp.log(jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]))
ce, z, n = token_losses(logits, jnp.array([[0, 2]]), jnp.array([[1.0, 1.0]]), z_loss=1e-4)
test_close(float(ce / n), -(np.log(0.7) + np.log(0.8)) / 2, eps=1e-6)
test_close(float(z), 0.0, eps=1e-9)                    # normalised logits: log Z = 0
m = decay_mask(params_of(Decoder(get_preset('tiny'), rngs=nnx.Rngs(0))))
test_eq((m['final_norm']['scale'], m['layers']['mlp_norm']['scale'], m['layers']['mlp']['up'], m['embed']), (False, False, True, True))

# %% [markdown]
# ## The train state and the step
#
# The state is a plain pytree: parameters (float32 master weights, whatever the compute dtype),
# optimizer state, step and a PRNG key. Keeping it pure makes it easy to shard, donate and checkpoint.
# The model is rebuilt from the parameters inside the jitted step with `nnx.merge`, which costs nothing
# at run time.
#
# Sharding comes from notebook 13's rules: parameters by their logical names; each optimizer moment
# like the parameter it belongs to; batches over (data, fsdp) and length over sequence. The step is
# compiled with these as input *and* output shardings, and the old state is donated, so updates
# happen in place and the state never leaves its devices.

# %%
#| export
def param_shardings(cfg: TrainConfig, mesh, abstract_params: dict) -> dict:
    "NamedSharding of every parameter, from the logical names on the model's variables."
    names = {tuple(str(getattr(k, 'key', k)) for k in path): v.get_metadata()['out_sharding']
             for path, v in nnx.to_flat_state(nnx.state(abstract_model(cfg.model), nnx.Param))}
    return jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(
            mesh, logical_spec(names[tuple(str(getattr(k, 'key', k)) for k in path)], cfg.mesh.rules)
        ),
        abstract_params,
    )

def _state_shardings(state_shape, p_shard: dict, mesh):
    "Parameter shardings for `params` and for every optimizer leaf whose path ends with a parameter's path."
    flat = {
        tuple(str(getattr(k, 'key', k)) for k in path): s
        for path, s in jax.tree_util.tree_flatten_with_path(p_shard)[0]
    }
    def find(path, leaf):
        keys = tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
        for i in range(len(keys)):
            s = flat.get(keys[i:])
            if s is not None and len(s.spec) <= leaf.ndim: return s
        return NamedSharding(mesh, P())
    return jax.tree_util.tree_map_with_path(find, state_shape)

@dataclass
class Trainer:
    """The compiled pieces of a run: graphdef, optimizer, shardings and the jitted step. `loss_fn(model, batch) ->
    (loss, metrics)` replaces the default objective, the masked next-token cross-entropy (+ z-loss, accumulated over
    `grad_accum` micro-batches), for stages that train on something else (preferences, rewards)."""
    cfg: TrainConfig
    mesh: jax.sharding.Mesh
    loss_fn: Callable | None = None
    def __post_init__(self):
        cfg = self.cfg
        self.graphdef, self.abstract_state = nnx.split(abstract_model(cfg.model), nnx.Param)
        self.abstract_params = nnx.to_pure_dict(self.abstract_state)
        self.tx = make_optimizer(cfg)
        p_shard = param_shardings(cfg, self.mesh, self.abstract_params)
        shape = jax.eval_shape(self._init, jax.random.key(0))
        self.state_sharding = _state_shardings(shape, p_shard, self.mesh)
        self.init = jax.jit(self._init, out_shardings=self.state_sharding)
        self.init_from = jax.jit(self._init_from, in_shardings=(p_shard, None), out_shardings=self.state_sharding)
        if self.loss_fn is not None and cfg.grad_accum != 1:
            raise ConfigError(
                "grad_accum applies to the next-token loss; a custom loss_fn sees whole batches (set grad_accum=1)"
            )
        # batches arrive already placed by `shard_batch` (each array with its own sharding), so jit takes theirs
        self.step = jax.jit(self._step, in_shardings=(self.state_sharding, None), donate_argnums=0,
                            out_shardings=(self.state_sharding, NamedSharding(self.mesh, P())))
        self.loss_and_grads = jax.jit(self._loss_and_grads, in_shardings=(self.state_sharding, None),
                                      out_shardings=(NamedSharding(self.mesh, P()), self.state_sharding['params']))

    def _init(self, key):
        pkey, key = jax.random.split(key)
        params = params_of(Decoder(self.cfg.model, rngs=nnx.Rngs(params=pkey)))
        return dict(
            params=params, opt=self.tx.init(params), step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(key)
        )

    def _init_from(self, params, key):
        "A fresh optimizer state around given `params` (fine-tuning, length extension)."
        params = jax.tree.map(lambda p, a: p.astype(a.dtype), params, self.abstract_params)
        return dict(
            params=params, opt=self.tx.init(params), step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(key)
        )

    def model(self, params) -> Decoder:
        "A `Decoder` holding `params` (a pure dict, concrete or traced)."
        state = jax.tree.map(lambda x: x, self.abstract_state)      # a fresh copy to fill
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def _sums(self, params, mb):
        logits = self.model(params)(mb['inputs'], mb['positions'], mb['segment_ids'])
        ce, z, n = token_losses(logits, mb['targets'], mb['loss_mask'], self.cfg.z_loss)
        return ce + z, (ce, z, n)

    def _accumulated(self, params, batch):
        "Per-token mean loss pieces and gradients, summed over `grad_accum` micro-batches then divided once."
        A = self.cfg.grad_accum
        micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)
        def accumulate(carry, mb):
            g_acc, ce_acc, z_acc, n_acc = carry
            (_, (ce, z, n)), g = jax.value_and_grad(self._sums, has_aux=True)(params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), ce_acc + ce, z_acc + z, n_acc + n), None
        zeros = jax.tree.map(jnp.zeros_like, params)
        (g, ce, z, n), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0, 0.0), micro)
        n = jnp.maximum(n, 1.0)
        return ce / n, z / n, n, jax.tree.map(lambda x: x / n, g)

    def _loss_and_grads(self, state, batch):
        "(loss, gradients) of a batch without updating anything: what the equivalence tests compare."
        ce, z, n, grads = self._accumulated(state['params'], batch)
        return ce + z, grads

    def _step(self, state, batch):
        cfg, params = self.cfg, state['params']
        if self.loss_fn is None:
            ce, z, n, grads = self._accumulated(params, batch)
            metrics = dict(loss=ce, z_loss=z, tokens=n)
        else:
            (loss, metrics), grads = jax.value_and_grad(lambda p: self.loss_fn(self.model(p), batch), has_aux=True)(
                params
            )
            metrics = dict(metrics, loss=loss)
        updates, opt = self.tx.update(grads, state['opt'], params)
        new = dict(params=optax.apply_updates(params, updates), opt=opt, step=state['step'] + 1, rng=state['rng'])
        return new, dict(
            metrics, grad_norm=optax.tree.norm(grads), lr=multi_phase_schedule(cfg.schedule)(state['step'])
        )

    def shard_batch(self, batch: dict, process_local: bool = True) -> dict:
        """Host batch -> global device arrays. Rows go over the data axes; `[rows, length]` arrays also go over the
        sequence axis, zigzag-balanced when it is sharded and the batch carries positions (they travel with their
        tokens, so the loss is unchanged). `process_local`: each process holds its own rows (a data loader's share);
        otherwise every process holds the whole batch (post-training's generated batches). Entries whose leading axis
        is not the rows (a loader's per-domain token counts) are not model inputs and stay on the host."""
        rows, length = np.shape(batch['inputs'])
        b = {k: np.asarray(v) for k, v in batch.items() if np.ndim(v) >= 1 and np.shape(v)[0] == rows}
        n_rows = math.prod(self.mesh.shape[a] for a in ('data', 'fsdp')) // (
            jax.process_count() if process_local else 1
        )
        if rows % max(n_rows, 1):
            raise ConfigError(
                f"a batch of {rows} rows cannot be split over the mesh's data x fsdp axes ({n_rows} ways); "
                f"make the batch size a multiple of {n_rows}"
            )
        token = {k for k, v in b.items() if v.ndim == 2 and v.shape == (rows, length)}
        n_seq = self.mesh.shape['sequence']
        if n_seq > 1 and self.cfg.balance_sequence and 'positions' in b:
            order = zigzag_order(length, n_seq)
            b = {k: v[:, order] if k in token else v for k, v in b.items()}
        rules, out = self.cfg.mesh.rules, {}
        for k, v in b.items():
            axes = ('batch', 'length') if k in token else ('batch',)
            sharding = NamedSharding(self.mesh, logical_spec(axes + (None,) * (v.ndim - len(axes)), rules))
            out[k] = (
                jax.make_array_from_process_local_data(sharding, v) if process_local else jax.device_put(v, sharding)
            )
        return out

# %% [markdown]
# ## FLOPs per token and MFU
#
# Model FLOPs utilisation compares the arithmetic the model *needs* with what the hardware could do.
# Per token, a forward and backward pass costs $6N$ for the $N$ parameters used in matmuls (every
# weight except the embedding table, which is a lookup; the output head counts), plus attention's two
# matmuls against the context, $12 \cdot L \cdot H \cdot h \cdot T$, counted over the full context as
# PaLM's appendix does. On a CPU there is no datasheet peak, so we measure one: the FLOP/s of a large
# float32 matmul, jitted and warmed up, on this machine. (The 8 simulated CPU devices of these
# notebooks share the same two cores, so the machine's peak is that one measurement, not eight of them;
# on TPUs and GPUs use the chip's datasheet peak times the number of chips.)

# %%
#| export
def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    "Training (forward + backward) matmul FLOPs per token: 6 N_matmul + 12 L H h T (PaLM's convention)."
    c = param_counts(cfg)
    n_matmul = c['attention'] + c['mlp'] + (c['lm_head'] or c['embedding'])
    return 6 * n_matmul + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len

def measured_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    "FLOP/s of a jitted n x n float32 matmul on the default device (a practical peak for CPUs)."
    a = jax.random.normal(jax.random.key(0), (n, n)); f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats): r = f(a)
    r.block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)

# %%
for name in ('tiny', 'xgen_4b', 'xgen_9b'):
    c = get_preset(name)
    f = flops_per_token(c, c.max_seq_len)
    print(f'{name:8} {f / 1e9:8.3f} GFLOP per token at {c.max_seq_len:,} tokens  (6N = {6 * param_counts(c)["non_embedding"] / 1e9:.3f} GFLOP without the head)')
peak = measured_peak_flops()
print(f'measured matmul peak on this machine: {peak / 1e9:.1f} GFLOP/s')

# %%
c9 = get_preset('xgen_9b')
by_hand = 6 * (num_params(c9) - c9.vocab_size * c9.d_model) + 12 * 36 * 32 * 128 * 8192   # all weights but the embedding table
test_close(flops_per_token(c9, 8192) / by_hand, 1.0, eps=1e-3)

# %% [markdown]
# ## Metrics while the run runs
#
# A run's metrics are written as each step finishes, not when the run returns, so that a run killed at step 900 has
# its 900 steps of history, and a person can watch it: every record goes to `history.jsonl` (one JSON object a line,
# flushed) and its numbers to TensorBoard event files in the same directory, so `tensorboard --logdir runs/` shows
# loss, learning rate, gradient norm, tokens/s and MFU live, one curve per stage. On resume, records from steps past the
# restored checkpoint are dropped first: those steps are about to be trained again, and the file must say what the
# resumed run did, once per step. (`tensorboardX` writes the event files; TensorBoard itself is only needed to view them.)

# %%
#| export
class MetricsLog:
    """Append each step's metrics to `out_dir/history.jsonl` and TensorBoard event files; `resume_step`: the checkpoint
    resumed. Only the lead process writes, and nothing is touched until the first step is logged (a finished run that
    is asked to resume leaves its files as they were)."""
    def __init__(self, out_dir, resume_step: int | None, tensorboard: bool = True):
        self.path, self.resume_step, self.tensorboard = Path(out_dir) / 'history.jsonl', resume_step or 0, tensorboard
        self.file = self.writer = None
        self.active = jax.process_index() == 0

    def _open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():                              # keep what the checkpoint covers, drop what will be redone
            lines = self.path.read_text().splitlines()
            keep = [l for l in lines if l.strip() and json.loads(l).get('step', 0) <= self.resume_step]
            if len(keep) != len(lines):
                tmp = self.path.with_suffix('.tmp')
                tmp.write_text(''.join(l + '\n' for l in keep))
                tmp.replace(self.path)
        self.file = self.path.open('a')
        if self.tensorboard:
            from tensorboardX import SummaryWriter
            # purge_step: TensorBoard drops this directory's older points from that step on (the redone steps)
            self.writer = SummaryWriter(str(self.path.parent), flush_secs=10, purge_step=self.resume_step + 1)

    def log(self, m: dict):
        if not self.active: return
        if self.file is None: self._open()
        self.file.write(json.dumps(m) + '\n'); self.file.flush()
        if self.writer is not None:
            for k, v in m.items():
                if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.writer.add_scalar(k, v, m['step'])

    def close(self):
        if self.file is not None: self.file.close()
        if self.writer is not None: self.writer.close()

# %% [markdown]
# ## The loop
#
# One loop trains every stage of the pipeline: pre-training here, length extension (notebook 20), and SFT, DPO and
# RL (notebooks 23-25). What differs between them is only *where batches come from* and *what loss they train*:
#
# - a **batch source** hands out `(batch, metrics)` for each step and can say where it stands (`state_dict`) and go
#   back there (`restore`), so resuming continues its sequence exactly. `LoaderBatches` reads a token store, with one
#   loader per schedule phase, switched at the step where the schedule enters the phase (so the learning rate and the
#   mixture anneal together). `GeneratedBatches` wraps a function of the step, which is how post-training builds
#   batches from conversations, preference pairs or fresh rollouts, returning its own metrics (an RL batch's reward)
#   beside the batch;
# - a **loss**: the default next-token cross-entropy, or a stage's `loss_fn(model, batch) -> (loss, metrics)`.
#
# Everything else is shared, so it is the same for every stage: the mesh and its shardings, batches placed on the
# mesh (zigzag-balanced when the length is sharded), orbax checkpoints with the stage's name and config, exact resume,
# metrics appended to `history.jsonl` and TensorBoard as steps happen, and the divergence stop: a loss that is NaN or
# infinite stops the run with a message naming the step, *before* anything is saved, so the last checkpoint on disk is
# the last good one. A checkpoint written by another stage or for another model is refused rather than resumed.

# %%
#| export
class TrainingDiverged(RuntimeError):
    "The loss became NaN or infinite; the last checkpoint on disk predates it."

@dataclass
class TrainResult:
    state: dict
    history: list
    trainer: Trainer
    def model(self) -> Decoder: return self.trainer.model(jax.device_get(self.state['params']))

def _loader_for(store, cfg: TrainConfig, phase: str, state=None) -> Loader:
    ph = phase if phase in store.phases else None
    lc = LoaderConfig(
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size // jax.process_count(),
        phase=ph,
        seed=cfg.seed,
        split=cfg.split,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return Loader(store, lc, state, vocab_size=cfg.model.vocab_size)

TOKEN_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')   # what a next-token batch holds

class LoaderBatches:
    "Batches from a token store, one loader per schedule phase; each process reads its own rows."
    process_local = True
    def __init__(self, store: TokenStore | str | Path, cfg: TrainConfig):
        self.store = TokenStore.open(store) if not isinstance(store, TokenStore) else store
        self.cfg = cfg

    def restore(self, saved: dict | None):
        if saved is None: self.phase, state = phase_at(self.cfg.schedule, 0), None
        else: self.phase, state = saved['phase'], LoaderState.from_pytree(saved['state'])
        self.loader = _loader_for(self.store, self.cfg, self.phase, state)

    def next(self, step: int, state, trainer) -> tuple[dict, dict]:
        want = phase_at(self.cfg.schedule, step)
        if want != self.phase: self.phase, self.loader = want, _loader_for(self.store, self.cfg, want)
        b = next(self.loader)
        return {k: b[k] for k in TOKEN_KEYS}, dict(phase=self.phase)     # domain counts stay with the loader

    def state_dict(self) -> dict:
        return dict(phase=self.phase, state={k: int(v) for k, v in self.loader.state.to_pytree().items()})

class GeneratedBatches:
    """Batches from `fn(step, state, trainer) -> batch` or `(batch, metrics)`; a pure function of the step (and the
    state it is given), so resuming needs no saved position. Every process builds the whole batch."""
    process_local = False
    def __init__(self, fn: Callable): self.fn = fn
    def restore(self, saved: dict | None): pass
    def next(self, step: int, state, trainer) -> tuple[dict, dict]:
        r = self.fn(step, state, trainer)
        return r if isinstance(r, tuple) else (r, {})
    def state_dict(self) -> dict: return {}

def _checked_params(params: dict, abstract: dict) -> dict:
    "`params` if its tree and shapes match the model's, else a ValueError naming the first difference."
    want = jax.tree_util.tree_flatten_with_path(abstract)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, a in want:
        name = jax.tree_util.keystr(path)
        if path not in got: raise ValueError(f"init_params has no parameter {name}")
        if tuple(got[path].shape) != tuple(a.shape):
            raise ValueError(f"init_params{name} has shape {tuple(got[path].shape)}, the model wants {tuple(a.shape)}")
    if len(got) != len(want):
        raise ValueError(f"init_params has {len(got) - len(want)} parameter(s) the model does not have")
    return params

def fit(cfg: TrainConfig, batches, out_dir, *, stage: str = 'pretrain', loss_fn: Callable | None = None,
        init_params: dict | None = None, config: dict | None = None, steps: int | None = None,
        stop_at: int | None = None, progress: bool = True, desc: str | None = None,
        peak_flops: float | None = None) -> TrainResult:
    """Train (or resume) stage `stage` for `steps` (default: the schedule's length) on `batches` (a `LoaderBatches`
    or `GeneratedBatches`), checkpointing into `out_dir`; `stop_at` pauses after that step, as an interruption would.
    `init_params`: start from these parameters instead of a random init (ignored when resuming); `config`: extra
    entries saved with every checkpoint beside the stage, model and train configs."""
    steps = cfg.steps if steps is None else min(steps, cfg.steps)
    end = steps if stop_at is None else min(stop_at, steps)
    config = {**(config or {}), 'stage': stage, 'model': cfg.model.to_dict(), 'train': cfg.to_dict()}
    peak = peak_flops or measured_peak_flops()        # measured outside the mesh, on one device of this machine
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(cfg.mesh.rules):
        tr = Trainer(cfg, mesh, loss_fn)
        ckpt = Checkpointer(Path(out_dir) / 'checkpoints', cfg.save_every, cfg.keep)
        start = ckpt.latest()
        if start is None:
            key = jax.random.key(cfg.seed)
            state = (tr.init(key) if init_params is None else
                     tr.init_from(jax.device_get(_checked_params(init_params, tr.abstract_params)), key))
            batches.restore(None)
        else:
            state, saved_batches, saved = ckpt.restore(
                start, (jax.eval_shape(tr._init, jax.random.key(0)), tr.state_sharding)
            )
            if saved.get('stage') != stage or saved.get('model') != config['model']:
                ckpt.close()
                raise ConfigError(
                    f"{out_dir} holds a {saved.get('stage', 'another')} checkpoint of another model or stage, "
                    f"not this {stage} run; use a fresh directory"
                )
            batches.restore(saved_batches)
        flops = flops_per_token(cfg.model, cfg.seq_len)
        history, t_last, tok_last, log = [], time.perf_counter(), 0, MetricsLog(out_dir, start)
        first = int(state['step'])
        bar = tqdm(range(first, end), initial=first, total=steps, disable=not progress, desc=desc or stage, unit='step')
        for step in bar:
            t0 = time.perf_counter()
            batch, extra = batches.next(step, state, tr)
            state, m = tr.step(state, tr.shard_batch(batch, batches.process_local))
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            if not math.isfinite(m['loss']):
                last = ckpt.latest()
                ckpt.close(); log.close()
                raise TrainingDiverged(f"{stage}: loss is {m['loss']} at step {step + 1}; stopped before saving. "
                                       f"The last good checkpoint is step {last} in {ckpt.dir}" if last is not None else
                                       f"{stage}: loss is {m['loss']} at step {step + 1}; no checkpoint had been saved")
            m.update(extra, step=step + 1, seconds=time.perf_counter() - t0)
            tok_last += m.get('tokens', 0)
            if 'tokens' in m and ((step + 1) % cfg.log_every == 0 or step + 1 == end):
                dt = time.perf_counter() - t_last
                m['tokens_per_s'] = tok_last / dt
                m['mfu'] = m['tokens_per_s'] * flops / peak
                t_last, tok_last = time.perf_counter(), 0
                bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.1e}", tok_s=f"{m['tokens_per_s']:,.0f}")
            history.append(m); log.log(m)
            ckpt.save(step + 1, state, batches.state_dict(), config, force=step + 1 == end)
        ckpt.close(); log.close()
    return TrainResult(state, history, tr)

def train(cfg: TrainConfig, store: TokenStore | str | Path, out_dir, *, steps: int | None = None, progress: bool = True,
          peak_flops: float | None = None, init_params: dict | None = None, stage: str = 'pretrain') -> TrainResult:
    """Pre-train (or resume) for `steps` (default: the schedule's length) on the token store `store`, checkpointing
    into `out_dir`: `fit` with `LoaderBatches` and the next-token loss. `init_params`: start from these parameters (a
    pure dict, e.g. a pre-trained model's) instead of a random init; ignored when `out_dir` holds a checkpoint."""
    return fit(cfg, LoaderBatches(store, cfg), out_dir, stage=stage, init_params=init_params, steps=steps,
               progress=progress, peak_flops=peak_flops, desc='train')

# %% [markdown]
# ## Pre-training the tiny model on the curated sample
#
# The sample corpus, curated (notebook 06), tokenised (07) and stored (08); then 60 steps of the tiny
# model, 8 rows of 256 tokens, with the two-phase schedule and mixture (the last 20% of steps on the
# annealing mixture), on a mesh that uses all 8 simulated devices with FSDP.

# %%
tmp = Path(tempfile.mkdtemp())
res = curate(sample_shards(), tmp / 'curated', CurateConfig(workers=2), quality_model=None, progress=False)
tok = Tokenizer(train_tokenizer([json.loads(l)['text'] for p in res.kept_paths for l in gzip.open(p, 'rt')], vocab_size=4096))
store = build_token_store(res.kept_paths, tok, tmp / 'store', plan=res.summary['mixture'])
cfg = TrainConfig(schedule=default_schedule(60, peak_lr=3e-3), mesh=MeshConfig(fsdp=-1), log_every=10, save_every=20)

# %% [markdown]
# (The run and its checks are `#| slow` cells, shown here with a CPU run's outputs: CI exercises the same loop in
# the shorter runs below, and in notebook 40's pipeline.)

# %%
#| slow
t0 = time.perf_counter()
run = train(cfg, store, tmp / 'run', progress=False)
print(f'{len(run.history)} steps in {time.perf_counter() - t0:.0f}s')
for h in run.history[9::10]:
    print(f"step {h['step']:3}  {h['phase']:6}  loss {h['loss']:.3f}  grad norm {h['grad_norm']:.2f}  lr {h['lr']:.1e}  "
          f"{h['tokens_per_s']:,.0f} tok/s  MFU {h['mfu']:.1%}")

# %%
#| slow
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.plot([h['step'] for h in run.history], [h['loss'] for h in run.history], label='loss')
ax.axvline(48, ls=':', c='grey'); ax.text(49, ax.get_ylim()[1] * 0.95, 'anneal', va='top')
ax.set_xlabel('step'); ax.set_ylabel('cross-entropy'); ax.set_title('tiny model on the curated sample, 8 devices (FSDP)')
plt.tight_layout(); plt.show()

# %%
#| slow
hist = run.history
test_eq(len(hist), 60)
test_eq(hist[-1]['loss'] < hist[0]['loss'] - 2.0, True)          # it learns
test_eq([h['phase'] for h in hist[47:49]], ['broad', 'anneal'])
params = run.state['params']
test_eq(params['layers']['mlp']['up'].sharding.spec, logical_spec(('layers', 'embed', 'mlp')))   # state stays sharded
test_eq(sorted(int(p.name) for p in (tmp / 'run' / 'checkpoints').iterdir() if p.name.isdigit()), [20, 40, 60])

# %% [markdown]
# ## Resuming is exact
#
# Train 16 steps in one go; train 8, stop, start a new `train` call on the same directory for the next
# 8. The second run restores state and loader position from the step-8 checkpoint and produces
# exactly the same losses. (`tests/test_train.py` does this across separate processes and over several
# meshes.)

# %%
short = TrainConfig(schedule=default_schedule(16, peak_lr=3e-3), mesh=MeshConfig(fsdp=-1), save_every=8)
straight = train(short, store, tmp / 'straight', progress=False).history
first = train(short, store, tmp / 'split', steps=8, progress=False).history
second = train(short, store, tmp / 'split', progress=False).history
print('straight:', [round(h['loss'], 5) for h in straight[6:11]])
print('resumed: ', [round(h['loss'], 5) for h in (first + second)[6:11]])
test_eq([h['loss'] for h in first + second], [h['loss'] for h in straight])

# %% [markdown]
# The resumed run's `history.jsonl` holds each of the 16 steps once, and its TensorBoard event files hold the same
# numbers (read back here with the event protocol buffer, as TensorBoard reads them). A run killed after its step-8
# checkpoint but with 11 steps logged loses steps 9-11 from the file when it resumes, because it trains them again.

# %%
import struct
from tensorboardX.proto.event_pb2 import Event
def tb_scalars(run_dir) -> dict:
    "tag -> [(step, value)] from a directory's TensorBoard event files (TFRecord: length, crc, event, crc)."
    out = {}
    for f in sorted(Path(run_dir).glob('events.out.tfevents.*')):
        b, i = f.read_bytes(), 0
        while i < len(b):
            n, = struct.unpack('<Q', b[i:i + 8]); e = Event.FromString(b[i + 12:i + 12 + n]); i += 16 + n
            for v in e.summary.value: out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out
logged = [json.loads(l) for l in (tmp / 'split' / 'history.jsonl').read_text().splitlines()]
test_eq([h['step'] for h in logged], list(range(1, 17)))
tb = tb_scalars(tmp / 'split')
print(sorted(tb))
test_eq([s for s, _ in tb['loss']], list(range(1, 17)))
test_close([v for _, v in tb['loss']], [h['loss'] for h in logged], eps=1e-5)
assert {'lr', 'grad_norm', 'tokens_per_s', 'mfu'} <= set(tb)
log = MetricsLog(tmp / 'killed', None, tensorboard=False)
for k in range(1, 12): log.log(dict(step=k, loss=1.0))
log.close()
log = MetricsLog(tmp / 'killed', 8, tensorboard=False)                  # resuming from the step-8 checkpoint
log.log(dict(step=9, loss=0.5)); log.log(dict(step=10, loss=0.5)); log.close()
test_eq([json.loads(l)['step'] for l in (tmp / 'killed' / 'history.jsonl').read_text().splitlines()], list(range(1, 11)))
MetricsLog(tmp / 'killed', 10, tensorboard=False).close()             # a finished run asked to resume writes nothing
test_eq([json.loads(l)['step'] for l in (tmp / 'killed' / 'history.jsonl').read_text().splitlines()], list(range(1, 11)))

# %% [markdown]
# ## Divergence stops cleanly
#
# A learning rate of 1e6 blows the weights up within a few steps; the run stops with a message, and
# the latest checkpoint on disk is the last one saved before the blow-up, which restores to finite
# weights.

# %%
bad = TrainConfig(schedule=(LRPhase('broad', 30, 1e6),), mesh=MeshConfig(fsdp=-1), save_every=2)
try: train(bad, store, tmp / 'bad', progress=False)
except TrainingDiverged as e: print('TrainingDiverged:', e)

# %%
test_fail(lambda: train(bad, store, tmp / 'bad2', progress=False), contains='last good checkpoint is step')
ck = Checkpointer(tmp / 'bad2' / 'checkpoints')
with jax.set_mesh(make_mesh(bad.mesh)), nn.logical_axis_rules(bad.mesh.rules):
    trb = Trainer(bad, make_mesh(bad.mesh))
    st, _, _ = ck.restore(ck.latest(), (jax.eval_shape(trb._init, jax.random.key(0)), trb.state_sharding))
test_eq(all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(st['params'])), True)

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
