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
# # The post-training machinery
#
# > What SFT, DPO and RL share: their config, one call into the training loop, batches, `chat`.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/22_posttrain.ipynb)

# %%
#| default_exp posttrain

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

from dataclasses import dataclass, field
from typing import Callable, Sequence

import jax
import numpy as np

from xgen_small.config import Config, ConfigError, ModelConfig
from xgen_small.generate import Sampling, generate
from xgen_small.model import Decoder, model_with_params, params_of
from xgen_small.schedules import LRPhase
from xgen_small.sharding import MeshConfig
from xgen_small.tasks import extract_answer
from xgen_small.tokenizer import Tokenizer, render_chat
from xgen_small.train import GeneratedBatches, TrainConfig, fit

# %%
from fastcore.test import test_eq, test_fail

from xgen_small.config import get_preset
from xgen_small.tasks import instruction_set, instruction_tokenizer

# %% [markdown]
# ## One loop for every stage
#
# SFT, DPO and RL differ in their loss and in where a batch comes from (fixed rows, fixed pairs, fresh samples from
# the policy), and in nothing else. So they do not have a loop of their own: `post_train` hands a stage's batch
# function and loss to notebook 18's `fit`, the same loop that pre-trains and extends the model, with its mesh,
# sharded batches, AdamW with decoupled weight decay and clipping, orbax checkpoints, live metrics and divergence
# stop. A checkpoint stores the stage's name and config next to the model config, so `load_run` (notebook 17) opens
# the output of any stage, and an interrupted stage resumes where it stopped: every batch is a pure function of
# `(seed, step)` (and, for RL, of the policy at that step), so a resumed run takes the same steps as an
# uninterrupted one. A stage's batch function may return its own metrics beside the batch (RL's mean reward and
# accuracy); they go into the history with the loss.
#
# `PostConfig` holds what the three stages share; each stage's config adds its own fields.

# %%
#| export
@dataclass(frozen=True)
class PostConfig(Config):
    "What every post-training stage shares: optimisation, schedule and bookkeeping."
    steps: int = 100
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    warmup_steps: int = 10
    final_lr_ratio: float = 0.1          # cosine decay to lr * this
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    save_every: int = 1000
    mesh: dict = field(default_factory=dict)    # MeshConfig fields (default: every device on fsdp)

    def __post_init__(self):
        for n in ('steps', 'batch_size', 'seq_len', 'save_every'):
            if getattr(self, n) < 1:
                raise ConfigError(f"{type(self).__name__}.{n} must be positive, got {getattr(self, n)}")
        if not self.lr > 0: raise ConfigError(f"{type(self).__name__}.lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"{type(self).__name__}.warmup_steps must be in [0, steps]")

    def train_config(self, model: ModelConfig, stage: str) -> TrainConfig:
        "The `TrainConfig` (optimizer, schedule, mesh) this stage trains with."
        lr_end = self.lr * self.final_lr_ratio
        return TrainConfig(
            model=model,
            seq_len=min(self.seq_len, model.max_seq_len),
            batch_size=self.batch_size,
            schedule=(LRPhase(stage, self.steps, self.lr, self.warmup_steps, 'cosine', lr_end),),
            weight_decay=self.weight_decay,
            clip_norm=self.clip_norm,
            seed=self.seed,
            save_every=self.save_every,
            mesh=MeshConfig(**self.mesh),
            b2=0.99,
            keep=2,
        )

@dataclass
class PostResult:
    "The trained parameters (a pure dict on the host), the model config and the per-step metrics."
    params: dict
    model_cfg: ModelConfig
    history: list
    def model(self) -> Decoder:
        return model_with_params(self.model_cfg, self.params)

def post_train(stage: str, tcfg: TrainConfig, params: dict, out_dir, batch_fn: Callable, config: dict,
               loss_fn: Callable | None = None, progress: bool = True, desc: str | None = None,
               stop_at: int | None = None) -> PostResult:
    """Run `tcfg.steps` steps of `stage` from `params` (or resume from `out_dir`) with notebook 18's training loop,
    checkpointing there; `stop_at` pauses after that step, as an interruption would. `batch_fn(step, state, trainer)
    -> batch` or `(batch, metrics)`; `loss_fn(model, batch) -> (loss, metrics)`, or None for the masked next-token loss
    (SFT). `config` is saved with every checkpoint."""
    r = fit(tcfg, GeneratedBatches(batch_fn), out_dir, stage=stage, loss_fn=loss_fn, init_params=params, config=config,
            stop_at=stop_at, progress=progress, desc=desc)
    return PostResult(jax.device_get(r.state['params']), tcfg.model, r.history)

# %% [markdown]
# Preference pairs and RL samples are scored one sequence per row (each row's log-likelihood is needed on its own),
# so they are padded rather than packed; `padded_rows` builds those rows with the same shift and mask convention.

# %%
#| export
def padded_rows(seqs: Sequence[tuple], seq_len: int, what: str = 'sequence') -> dict:
    "One right-padded row per `(ids, mask)`: inputs `ids[:-1]`, targets `ids[1:]`, loss mask `mask[1:]`, segment 1."
    a = {k: np.zeros((len(seqs), seq_len), np.int32) for k in ('inputs', 'targets', 'segment_ids', 'positions')}
    a['loss_mask'] = np.zeros((len(seqs), seq_len), np.float32)
    for i, (ids, mask) in enumerate(seqs):
        n = len(ids) - 1
        if n > seq_len: raise ValueError(f"{what} {i} has {len(ids)} tokens, more than seq_len + 1 = {seq_len + 1}")
        a['inputs'][i, :n], a['targets'][i, :n] = ids[:-1], ids[1:]
        a['segment_ids'][i, :n], a['positions'][i, :n], a['loss_mask'][i, :n] = 1, np.arange(n), mask[1:]
    return a

# %% [markdown]
# Each stage draws its batch for step `s` from per-epoch permutations seeded by `(seed, epoch)`: every item is seen
# once per epoch, in a different order each epoch, and step `s`'s batch depends on nothing but `s`, so a resumed run
# takes exactly the batches an uninterrupted one would.

# %%
#| export
def epoch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    "The `batch_size` item indices of `step`: consecutive slots of per-epoch permutations seeded by `(seed, epoch)`."
    seen = step * batch_size + np.arange(batch_size)        # the items this step takes, counted over all epochs
    order = {e: np.random.default_rng([seed, e]).permutation(n) for e in set((seen // n).tolist())}
    return np.array([order[s // n][s % n] for s in seen.tolist()])

# %%
print([epoch_indices(0, s, 4, 6).tolist() for s in range(3)])

# %%
test_eq(sorted(np.concatenate([epoch_indices(0, s, 3, 6) for s in range(2)]).tolist()), list(range(6)))  # one epoch
test_eq(epoch_indices(0, 5, 4, 6), epoch_indices(0, 5, 4, 6))
r = padded_rows([([5, 6, 7, 8], [0, 0, 1, 1])], 6)
test_eq(r['inputs'][0].tolist(), [5, 6, 7, 0, 0, 0]); test_eq(r['targets'][0].tolist(), [6, 7, 8, 0, 0, 0])
test_eq(r['loss_mask'][0].tolist(), [0, 1, 1, 0, 0, 0]); test_eq(r['segment_ids'][0].tolist(), [1, 1, 1, 0, 0, 0])
test_fail(lambda: padded_rows([([1] * 9, [1] * 9)], 6, 'pair'), contains='pair 0 has 9 tokens')
test_fail(lambda: PostConfig(warmup_steps=500), contains='warmup_steps')
tc = PostConfig(steps=40, lr=2e-3).train_config(get_preset('tiny'), 'sft')
test_eq((tc.steps, tc.schedule[0].name, tc.schedule[0].peak_lr), (40, 'sft', 2e-3))

# %% [markdown]
# A reply is generated greedily after the assistant role token, stopping at the end-of-turn token. `chat` is the
# one function every post-training notebook uses to look at what the model says.

# %%
#| export
def chat(model: Decoder, tok: Tokenizer, questions: Sequence[str | list], max_new_tokens: int = 48, *,
         sampling: Sampling = Sampling(), seed: int = 0) -> list[str]:
    "The model's reply to each question (a user message, or a list of messages)."
    prompts = [
        render_chat(tok, [dict(role='user', content=q)] if isinstance(q, str) else q, add_generation_prompt=True).ids
        for q in questions
    ]
    out = generate(model, prompts, max_new_tokens, sampling=sampling, stop_tokens=tok.turn_end_ids, seed=seed)
    return [tok.decode(t) for t in out.tokens]

def _reply_ok(conv: dict, reply: str) -> bool:
    "Exact match, except math: the working must match and a stated answer must be the right one (either style is fine)."
    ref = conv['messages'][-1]['content']
    if conv.get('domain') != 'math': return reply == ref
    working = ref.split(' The answer is')[0]
    return reply.split(' The answer is')[0] == working and extract_answer(reply) in (None, conv['answer'])

def reply_accuracy(model: Decoder, tok: Tokenizer, conversations: Sequence[dict], max_new_tokens: int = 48) -> dict:
    """Per domain (and 'all'), the fraction of greedy replies that are right: equal to the reference, or for math,
    the right working and no wrong stated answer."""
    replies = chat(model, tok, [c['messages'][:-1] for c in conversations], max_new_tokens)
    ok = [_reply_ok(c, r) for c, r in zip(conversations, replies)]
    hits = {}
    for c, k in zip(conversations, ok): hits.setdefault(c.get('domain', 'other'), []).append(k)
    out = {d: float(np.mean(h)) for d, h in sorted(hits.items())}
    out['all'] = float(np.mean(ok))
    return out

# %%
#| export
def random_params(model_cfg: ModelConfig, seed: int = 0) -> dict:
    "Freshly initialised parameters of a `model_cfg` decoder, as a pure dict on the host."
    from flax import nnx
    return jax.device_get(params_of(Decoder(model_cfg, rngs=nnx.Rngs(params=seed))))

# %% [markdown]
# An untrained model's replies are noise, but the plumbing is all here: a greedy reply per question, stopping at the
# end-of-turn token, and a score per domain (notebook 23 trains a model whose replies are worth reading).

# %%
tok = instruction_tokenizer()
model = model_with_params(get_preset('tiny'), random_params(get_preset('tiny')))
held = instruction_set(4, seed=5, split='test')
print(chat(model, tok, [c['messages'][-2]['content'] for c in held], max_new_tokens=8))
scores = reply_accuracy(model, tok, held, max_new_tokens=8)
print(scores)

# %%
test_eq(set(scores), {c['domain'] for c in held} | {'all'})
test_eq(chat(model, tok, ['What is 2 + 3?'], 8), chat(model, tok, ['What is 2 + 3?'], 8))        # greedy: deterministic

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
