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
# # Supervised fine-tuning
#
# > Supervised fine-tuning: conversations packed with segment ids, trained on the assistant's tokens only.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/23_sft.ipynb)

# %%
#| default_exp sft

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
# xGen-small's post-training has two halves: supervised fine-tuning (SFT) on "a diverse, high-quality instruction
# dataset spanning mathematics, coding, safety, and general-purpose domains to establish core behaviours and
# alignment", then preference learning and large-scale online reinforcement learning. SFT is the simplest of the
# three and the one that decides the *format* the later stages build on: the chat template, the end-of-turn token
# the generator stops at, and the answer sentence ("The answer is 42.") that notebook 21's math reward reads.
#
# Three things make SFT different from pre-training, and each is a few lines here:
#
# 1. **Only assistant tokens are trained.** The user's words are context, not targets: training on them would teach
#    the model to write questions. `render_chat` (notebook 07) already returns a 0/1 mask of assistant content and
#    its end-of-turn token; the loss uses it.
# 2. **Conversations are packed, not padded.** Short chats padded to the row length waste most of a batch. We pack
#    them first-fit-decreasing into rows and give each its own segment id and positions, so attention never crosses
#    from one conversation into the next (the same segment-id machinery as pre-training packing, notebook 08).
# 3. **Its own schedule.** A short warmup and a cosine decay at a learning rate below pre-training's peak.
#
# The paper's SFT set is not public. We generate a small one here, deterministically from a seed: every example is
# written by this project's code (templates and word lists in this notebook), so its licence is the repository's
# (Apache-2.0).

# %%
#| export
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from xgen_small.config import ModelConfig
from xgen_small.posttrain import PostConfig, PostResult, epoch_indices, post_train
from xgen_small.tokenizer import Tokenizer, render_chat


# %%
import time

import jax

from xgen_small.posttrain import padded_rows
from xgen_small.tokenizer import END_TURN

# %%
from fastcore.test import test_close, test_eq, test_fail

from xgen_small.posttrain import chat, random_params, reply_accuracy
from xgen_small.tasks import DOMAINS, extract_answer, instruction_set, instruction_tokenizer, math_reward, split_of

# %% [markdown]
# ## Packing conversations with segment ids
#
# Each conversation is rendered to ids and a mask; the input is `ids[:-1]`, the target `ids[1:]` and the loss mask
# `mask[1:]` (a target is trained when it is an assistant token). Shifting *per conversation* before packing means
# no position is ever asked to predict the first token of the next conversation. Rows are filled first-fit in order
# of decreasing length, the standard bin-packing heuristic; leftover space is padding with segment id 0 and no loss.
# A conversation longer than a row is an error that names it, never a silent truncation: cutting it would train
# the model on a reply without its end.

# %%
#| export
@dataclass
class Packed:
    "Rows of packed conversations: `[rows, seq_len]` arrays the training step takes, and how full they are."
    inputs: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_mask: np.ndarray

    def __len__(self): return len(self.inputs)
    def batch(self, idx) -> dict:
        return {k: getattr(self, k)[idx] for k in ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')}
    @property
    def fill(self) -> float: return float((self.segment_ids > 0).mean())

def pack_conversations(tok: Tokenizer, conversations: Sequence[dict], seq_len: int) -> Packed:
    "Render every conversation (`{'messages': [...]}` or a message list) and pack them first-fit-decreasing into rows."
    seqs = []
    for i, c in enumerate(conversations):
        r = render_chat(tok, c['messages'] if isinstance(c, dict) else c)
        if len(r.ids) - 1 > seq_len:
            raise ValueError(f"conversation {i} has {len(r.ids)} tokens, more than seq_len + 1 = {seq_len + 1}; "
                             "raise seq_len or shorten it")
        if not any(r.mask[1:]): raise ValueError(f"conversation {i} has no assistant turn to train on")
        seqs.append((r.ids, r.mask))
    rows, room = [], []                                # rows: lists of sequence indices; room: free slots per row
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0])):
        need = len(seqs[i][0]) - 1
        j = next((j for j, r in enumerate(room) if r >= need), None)
        if j is None: rows.append([]); room.append(seq_len); j = len(rows) - 1
        rows[j].append(i); room[j] -= need
    a = {k: np.zeros((len(rows), seq_len), np.int32) for k in ('inputs', 'targets', 'segment_ids', 'positions')}
    mask = np.zeros((len(rows), seq_len), np.float32)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(sorted(members), 1):
            ids, m = seqs[i]; n = len(ids) - 1
            a['inputs'][r, at:at + n], a['targets'][r, at:at + n] = ids[:-1], ids[1:]
            a['segment_ids'][r, at:at + n], a['positions'][r, at:at + n] = s, np.arange(n)
            mask[r, at:at + n] = m[1:]; at += n
    return Packed(**a, loss_mask=mask)

# %% [markdown]
# We need a tokenizer to see it: notebook 21's `instruction_tokenizer`, trained on the sample corpus plus a few
# generated conversations (so that words like `def` and `answer` get their own pieces).

# %%
data = instruction_set(8, seed=0)
tok = instruction_tokenizer()
packed = pack_conversations(tok, instruction_set(64, seed=0), 256)
print(f'{len(packed)} rows of 256 tokens for 64 conversations, {packed.fill:.0%} full; '
      f'{packed.loss_mask.sum() / (packed.segment_ids > 0).sum():.0%} of the real tokens are trained on')
row = packed.batch(0)
print('segments in row 0:', sorted(set(row['segment_ids'].tolist()) - {0}))
print('trained targets of segment 1:', repr(tok.decode(row['targets'][(row['segment_ids'] == 1) & (row['loss_mask'] > 0)].tolist(), specials=True)))

# %%
# every conversation's assistant replies are exactly what the mask trains on, in every row
p = pack_conversations(tok, data, 256)
got = sorted(tok.decode(p.targets[r][(p.segment_ids[r] == s) & (p.loss_mask[r] > 0)].tolist(), specials=True)
             for r in range(len(p)) for s in set(p.segment_ids[r].tolist()) - {0})
test_eq(got, sorted(d['messages'][-1]['content'] + END_TURN for d in data))
test_eq(((p.segment_ids == 0) & (p.loss_mask > 0)).sum(), 0)                          # padding is never trained
starts = (p.positions == 0) & (p.segment_ids > 0)
test_eq(int(starts.sum()), len(data))                                                   # positions restart per conversation
test_fail(lambda: pack_conversations(tok, data, 16), contains='more than seq_len')
test_fail(lambda: pack_conversations(tok, [[dict(role='user', content='hi')]], 64), contains='no assistant turn')
r = padded_rows([([5, 6, 7, 8], [0, 0, 1, 1])], 6)
test_eq(r['inputs'][0].tolist(), [5, 6, 7, 0, 0, 0]); test_eq(r['targets'][0].tolist(), [6, 7, 8, 0, 0, 0])
test_eq(r['loss_mask'][0].tolist(), [0, 1, 1, 0, 0, 0]); test_eq(r['segment_ids'][0].tolist(), [1, 1, 1, 0, 0, 0])
test_fail(lambda: padded_rows([([1] * 9, [1] * 9)], 6, 'pair'), contains='pair 0 has 9 tokens')

# %% [markdown]
# ## SFT
#
# `SFTConfig` adds nothing to `PostConfig` but its defaults; `sft` packs once, then draws each step's rows from a
# per-epoch permutation seeded by `(seed, epoch)`: every row is seen once per epoch, in a different order each
# epoch, and step `s`'s batch does not depend on anything but `s`.

# %%
#| export
@dataclass(frozen=True)
class SFTConfig(PostConfig):
    "Supervised fine-tuning: a learning rate a few times below pre-training's, a short warmup, cosine decay."
    steps: int = 200
    lr: float = 1e-3

def sft(params: dict, model_cfg: ModelConfig, tok: Tokenizer, conversations: Sequence[dict], cfg: SFTConfig, out_dir,
        *, progress: bool = True, stop_at: int | None = None) -> PostResult:
    "Fine-tune `params` on `conversations` (assistant tokens only), checkpointing into `out_dir` (resumable)."
    tcfg = cfg.train_config(model_cfg, 'sft')
    packed = pack_conversations(tok, conversations, tcfg.seq_len)
    n, B = len(packed), cfg.batch_size
    def batch_fn(step, state, tr): return packed.batch(epoch_indices(cfg.seed, step, B, n))
    return post_train('sft', tcfg, params, out_dir, batch_fn, dict(sft=cfg.to_dict(), rows=n, fill=packed.fill),
                      progress=progress, stop_at=stop_at)

# %% [markdown]
# ## Fine-tuning the tiny model
#
# The run below starts from a *randomly initialised* tiny model rather than a pre-trained one, so that this notebook
# stands alone and runs in about a minute on a CPU; notebook 40 chains the stages (pre-train, extend, SFT, DPO, RL)
# on one model. Everything the model knows after it, it learned from the instruction set.

# %%
import tempfile
from pathlib import Path

from flax import nnx

from xgen_small.config import get_preset
mcfg = get_preset('tiny', vocab_size=tok.vocab_size, max_seq_len=256)
train_set, held_out = instruction_set(1200, seed=0), instruction_set(64, seed=10_000, split='test')
question = lambda c: c['messages'][-2]['content']
print('held-out questions also in the training set:', len({question(c) for c in held_out} & {question(c) for c in train_set}), 'of', len(held_out))
test_eq({question(c) for c in held_out} & {question(c) for c in train_set}, set())
cfg = SFTConfig(steps=100, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=10)
work = Path(tempfile.mkdtemp())
start = random_params(mcfg)

# %% [markdown]
# The 100-step run and the tables and checks built on it are `#| slow` cells, shown with a CPU run's outputs; CI
# runs the short resumption check further down, and the whole chain in notebook 40's pipeline.

# %%
#| slow
t0 = time.perf_counter()
res = sft(start, mcfg, tok, train_set, cfg, work / 'sft', progress=False)
print(f"{cfg.steps} steps in {time.perf_counter() - t0:.0f}s; loss {res.history[0]['loss']:.2f} -> {res.history[-1]['loss']:.2f}")

# %% [markdown]
# The held-out conversations come from the other side of the split: every generated question belongs to 'train' or
# 'test' by a hash of its text (`split_of`, the same rule RL's tasks and DPO's pairs use), so none of them was ever a
# training question (asserted above). The generators are small, so the test side is small too (35 arithmetic
# questions, 8 code tasks, 1 safety request); the table below reports the domains separately.

# %%
#| slow
from IPython.display import Markdown
questions = [c['messages'][-2]['content'] for c in held_out[:6]]
from xgen_small.model import model_with_params
b, a = chat(model_with_params(mcfg, start), tok, questions, 32), chat(res.model(), tok, questions, 32)
Markdown('| question | before SFT | after SFT |\n|---|---|---|\n' + '\n'.join(
    f"| {q} | {x[:60]!r} | {y!r} |".replace('\n', ' ') for q, x, y in zip(questions, b, a)))

# %%
#| slow
acc_before, acc_after = reply_accuracy(model_with_params(mcfg, start), tok, held_out), reply_accuracy(res.model(), tok, held_out)
Markdown('| domain | right before | after |\n|---|---:|---:|\n' + '\n'.join(
    f"| {d} | {acc_before[d]:.0%} | {acc_after[d]:.0%} |" for d in acc_after))

# %% [markdown]
# A hundred steps teach every domain's *form*: refusals, code blocks, the working-then-answer shape of the math
# replies. On questions the model never trained on, form is most of what transfers: the code tasks are templates
# over a few function shapes, so an unseen `k` or name is still written right; the math replies have the right shape
# and mostly the wrong numbers; a general question whose answer is a fact (an unseen capital or opposite) cannot be
# right; and the one held-out safety request gets a refusal aimed at another request. (Before the hash split, the
# held-out set shared 49 of its 64 conversations with the training set, and this table read 50-100% everywhere:
# memory, not skill.) Notebooks 24 and 25 fine-tune on math alone for 120 steps before preference learning and RL take
# over.

# %%
#| slow
import matplotlib.pyplot as plt
fig, ax = plt.subplots(1, 2, figsize=(9, 2.8))
ax[0].plot([h['loss'] for h in res.history]); ax[0].set(xlabel='step', ylabel='loss on assistant tokens', yscale='log')
ax[1].plot([h['lr'] for h in res.history]); ax[1].set(xlabel='step', ylabel='learning rate')
plt.tight_layout()

# %%
#| slow
test_eq(acc_before['all'], 0.0)
assert acc_after['all'] >= 0.3 and acc_after['code'] >= 0.5 and acc_after['math'] > 0, acc_after   # on questions never trained on
assert res.history[-1]['loss'] < 0.25 * res.history[0]['loss']
test_close(res.history[0]['lr'], 0.0, eps=1e-12); test_close(max(h['lr'] for h in res.history), 3e-3, eps=1e-4)

# %% [markdown]
# The run directory opens with `load_run` like any training run, and a run stopped part way resumes to the same
# weights as one that never stopped (every batch is a function of its step):

# %%
from xgen_small.checkpoint import load_run
small = SFTConfig(steps=6, batch_size=8, seq_len=128, warmup_steps=2, save_every=2)
full = sft(start, mcfg, tok, train_set[:100], small, work / 'full', progress=False)
loaded, saved = load_run(work / 'full')
test_eq(saved['stage'], 'sft'); test_eq(saved['sft']['steps'], small.steps)
sft(start, mcfg, tok, train_set[:100], small, work / 'cut', progress=False, stop_at=3)
resumed = sft(start, mcfg, tok, train_set[:100], small, work / 'cut', progress=False)
test_eq(len(resumed.history), 3)
test_eq(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x == y).all()), full.params, resumed.params)), [True] * len(jax.tree.leaves(full.params)))
test_fail(lambda: SFTConfig(steps=0), contains='steps must be positive')
test_fail(lambda: SFTConfig.from_dict(dict(stepz=3)), contains="no field(s) ['stepz']")

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
