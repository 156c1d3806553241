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
# # Checkpoints
#
# > Orbax checkpoints of a run, loading a run's model for evaluation, and exporting a finished model.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/17_checkpoint.ipynb)

# %%
#| default_exp checkpoint

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

import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from xgen_small.config import ModelConfig
from xgen_small.hf import save_hf_checkpoint
from xgen_small.model import Decoder, abstract_model, model_with_params, params_of

# %%
import tempfile

import jax.numpy as jnp
import numpy as np
from fastcore.test import test_eq, test_fail
from flax import nnx

from xgen_small.config import get_preset
from xgen_small.data.sample import load_sample
from xgen_small.hf import load_hf_checkpoint
from xgen_small.tokenizer import Tokenizer, train_tokenizer

# %% [markdown]
# ## Checkpoints
#
# Orbax's `CheckpointManager` saves every `save_every` steps and keeps the last `keep`. A checkpoint
# holds the train state (parameters, optimizer state, step, PRNG key), the data loader's state, and the
# run's config. Orbax writes each checkpoint into a temporary directory and renames it into place only
# when everything is on disk, so a crash during a save leaves at worst a temporary directory that is
# ignored, never a half-written "latest" checkpoint. Restoring places every array directly onto its
# devices with its sharding.

# %%
#| export
ITEMS = ('state', 'loader', 'config')     # what every checkpoint holds, in this order

class Checkpointer:
    "Save and restore (train state, loader state, config) with orbax."
    def __init__(self, directory, save_every: int = 50, keep: int = 3):
        self.dir = Path(directory).absolute()
        self.mngr = ocp.CheckpointManager(
            self.dir,
            item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep),
        )

    def save(self, step: int, state, loader: dict, config: dict, force: bool = False) -> bool:
        saved = self.mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(loader), config=ocp.args.JsonSave(config)
            ),
            force=force,
        )
        self.mngr.wait_until_finished()
        return saved

    def latest(self) -> int | None: return self.mngr.latest_step()

    def restore(self, step: int, target) -> tuple:
        "(state, loader state, config dict) of `step`; `target`: abstract state with shardings."
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), *target)
        r = self.mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), loader=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()
            ),
        )
        return r['state'], r['loader'], r['config']

    def close(self): self.mngr.close()


# %% [markdown]
# A run directory holds `checkpoints/<step>/{state,loader,config}`. Saving a freshly initialised tiny model's state
# (no optimizer here, to keep the example small) and restoring it onto the same shardings gives back every array:

# %%
tmp = Path(tempfile.mkdtemp())
cfg = get_preset('tiny')
model = Decoder(cfg, rngs=nnx.Rngs(0))
state = dict(params=params_of(model), step=jnp.zeros((), jnp.int32))
ck = Checkpointer(tmp / 'run' / 'checkpoints', save_every=10, keep=2)
print('saved at step 5 (not a multiple of save_every):', ck.save(5, state, {'phase': 'main'}, {'model': cfg.to_dict()}))
print('saved at step 10:', ck.save(10, state, {'phase': 'main'}, {'model': cfg.to_dict()}))
shardings = jax.tree.map(lambda x: x.sharding, state)
restored, loader_state, config = ck.restore(ck.latest(), (state, shardings))
ck.close()
print('latest', 10, '| loader', loader_state, '| model config restored:', ModelConfig.from_dict(config['model']) == cfg)

# %%
test_eq(loader_state, {'phase': 'main'})
test_eq(jax.tree.structure(restored), jax.tree.structure(state))
assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))


# %% [markdown]
# ## Loading a run for evaluation
#
# Every run directory of notebook 18 (and each stage directory of notebook 20) holds orbax checkpoints that carry
# their own `TrainConfig`. `load_run` reads the config first, then restores only the parameters onto one device
# (evaluation needs no mesh and no optimizer state), and returns a model whose attention is the platform default,
# so a model trained with sequence-parallel attention evaluates anywhere.

# %%
#| export
def load_run(run_dir, step: int | None = None) -> tuple[Decoder, dict]:
    "The model saved in training run `run_dir` (latest step unless `step`), and the run's config dict."
    ckpt = Path(run_dir).absolute() / 'checkpoints'
    if not ckpt.exists(): raise FileNotFoundError(f"no checkpoints in {run_dir} (expected {ckpt})")
    mngr = ocp.CheckpointManager(ckpt, item_names=ITEMS)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None: raise FileNotFoundError(f"no finished checkpoint in {ckpt}")
        if step not in mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {ckpt}; have {sorted(mngr.all_steps())}")
        config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
        cfg = ModelConfig.from_dict(config['model'])
        if cfg.attention_impl.startswith('seq_'): cfg = cfg.replace(attention_impl='auto')
        abstract = params_of(abstract_model(cfg))
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), abstract)
        params = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={'params': target},
                    restore_args=jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=one), {'params': target}),
                    partial_restore=True,
                )
            ),
        )['state']['params']
    finally:
        mngr.close()
    return model_with_params(cfg, params), config


# %%
loaded, saved_config = load_run(tmp / 'run')
x = jnp.arange(16)[None]
print('same logits as the saved model:', bool(np.array_equal(np.asarray(loaded(x)), np.asarray(model(x)))))

# %%
assert np.array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
test_fail(lambda: load_run(tmp / 'nothing'), contains='no checkpoints')
test_fail(lambda: load_run(tmp / 'run', step=7), contains='no checkpoint for step 7')


# %% [markdown]
# ## Exporting a finished model
#
# `export_model` writes what a user of the trained model needs, in the two forms they may want it:
# `checkpoints/` is an orbax checkpoint laid out like a training run's but holding only the parameters (a third of
# the size, no optimizer state), so `load_run`, `xgen-small eval --run` and `xgen-small sft --init` all open it;
# `hf/` is the Llama-format safetensors directory of notebook 16, which `transformers` loads as `LlamaForCausalLM`;
# `tokenizer.model` is the sentencepiece model both need. The pipeline's report stage (notebook 40) calls it on the
# final model.

# %%
#| export
def export_model(model, tok, path, *, config: dict | None = None) -> Path:
    """`model` as a parameters-only orbax run directory (`load_run` opens it), `hf/` Llama safetensors, and the
    tokenizer."""
    path = Path(path); path.mkdir(parents=True, exist_ok=True)
    if (path / 'checkpoints').exists(): shutil.rmtree(path / 'checkpoints')
    ck = Checkpointer(path / 'checkpoints', save_every=1, keep=1)
    ck.save(
        0, {'params': jax.device_get(params_of(model))}, {}, dict(config or {}, model=model.cfg.to_dict()), force=True
    )
    ck.close()
    save_hf_checkpoint(model, path / 'hf', bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    tok.save(path / 'tokenizer.model')
    return path


# %%
tok = Tokenizer(train_tokenizer([d['text'] for d in load_sample()[:300]], 1024))
out = export_model(model, tok, tmp / 'export', config={'stage': 'example'})
print(sorted(p.name for p in out.iterdir()), sorted(p.name for p in (out / 'hf').iterdir()))
again, again_config = load_run(out)
from_hf = load_hf_checkpoint(out / 'hf')

# %%
test_eq(again_config['stage'], 'example')
assert np.array_equal(np.asarray(again(x)), np.asarray(model(x)))
assert np.allclose(np.asarray(from_hf(x)), np.asarray(model(x)), atol=1e-5)
test_eq(Tokenizer(out / 'tokenizer.model').encode('hello world'), tok.encode('hello world'))

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
