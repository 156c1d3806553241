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
# > A small instruction set over the paper's four SFT domains (math, code, safety, general), rendered with the chat template, packed with segment ids, trained on assistant tokens only, with its own learning-rate schedule; and the loop that all three post-training stages share.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/21_sft.ipynb)

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
# the generator stops at, and the answer sentence ("The answer is 42.") that notebook 23's reward reads.
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

import dataclasses
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from xgen_small.config import ConfigError, ModelConfig
from xgen_small.generate import Sampling, generate
from xgen_small.model import Decoder
from xgen_small.schedules import LRPhase, multi_phase_schedule
from xgen_small.sharding import MeshConfig, make_mesh
from xgen_small.tokenizer import END_TURN, Tokenizer, parse_chat, render_chat
from xgen_small.train import Checkpointer, MetricsLog, TrainConfig, Trainer, TrainingDiverged, _checked_params

# %% [markdown]
# ## An instruction set over four domains
#
# Each domain has a generator that draws one conversation from a random generator:
#
# - **math**: arithmetic questions answered with the working (`3 + 4 = 7.`) and, in half of them, a final sentence
#   `The answer is 7.` That sentence is the contract with notebooks 22 and 23: `math_reward` reads exactly it, and a
#   reply without it earns nothing. SFT data is rarely uniform in format, and this mix is deliberate: a model
#   fine-tuned on it states its answer only some of the time, which is the kind of behaviour that preference
#   learning and RL, with their answer-checking rewards, then correct.
# - **code**: "write a Python function that ..." tasks from a table of small specifications, each with its reference
#   solution *and unit tests*, so that the same table serves as an RL task with an executable reward.
# - **safety**: requests to help hurt someone or break the law, answered with a short refusal that offers a safe
#   alternative; and their harmless look-alikes ("how do I kill a stuck Python process?"), answered helpfully, so
#   the model learns the difference rather than refusing on keywords.
# - **general**: word manipulation (reverse, sort, count), capitals, opposites: tasks with one right answer, so the
#   before/after comparison below is objective.

# %%
#| export
DOMAINS = ('math', 'code', 'safety', 'general')
SYSTEM_PROMPT = 'You are a helpful assistant.'

def arithmetic_problem(rng, max_operand: int = 10, ops: str = '+-') -> dict:
    "One arithmetic question: `{'question', 'answer', 'solution'}` (`answer` a string, non-negative for '-')."
    a, b = int(rng.integers(0, max_operand)), int(rng.integers(0, max_operand))
    op = ops[int(rng.integers(len(ops)))]
    if op == '-' and b > a: a, b = b, a
    c = {'+': a + b, '-': a - b, '*': a * b}[op]
    return dict(question=f'What is {a} {op} {b}?', answer=str(c), solution=f'{a} {op} {b} = {c}. The answer is {c}.')

def every_arithmetic_problem(max_operand: int = 10, ops: str = '+-') -> list[dict]:
    "Every question `arithmetic_problem` can draw for these settings, once each, in a fixed order."
    out = []
    for op in ops:
        for a in range(max_operand):
            for b in range(max_operand):
                if op == '-' and b > a: continue
                c = {'+': a + b, '-': a - b, '*': a * b}[op]
                out.append(dict(question=f'What is {a} {op} {b}?', answer=str(c), solution=f'{a} {op} {b} = {c}. The answer is {c}.'))
    return out

ANSWER = re.compile(r'the answer is (-?\d+(?:\.\d+)?)', re.IGNORECASE)

def extract_answer(text: str) -> str | None:
    "The number in the reply's last `The answer is N.` sentence, or None when there is none."
    found = ANSWER.findall(text)
    return found[-1] if found else None

def math_reward(text: str, answer: str) -> float:
    "1.0 when the reply's stated answer equals `answer` numerically, else 0.0 (no answer, garbage: 0.0)."
    got = extract_answer(text)
    try: return float(got is not None and math.isclose(float(got), float(answer), abs_tol=1e-9))
    except (TypeError, ValueError): return 0.0

# name, signature, what it returns, solution body, tests (expressions that must be True); {k} is drawn per example
CODE_TASKS = (
    ('add_k', 'x', 'x plus {k}', 'return x + {k}', ('add_k(1) == 1 + {k}', 'add_k(-{k}) == 0', 'add_k(10) == 10 + {k}')),
    ('times_k', 'x', 'x multiplied by {k}', 'return x * {k}', ('times_k(2) == 2 * {k}', 'times_k(0) == 0', 'times_k(-1) == -{k}')),
    ('is_even', 'n', 'True when n is even, else False', 'return n % 2 == 0', ('is_even(4)', 'not is_even(7)', 'is_even(0)')),
    ('largest', 'xs', 'the largest number in the list xs', 'return max(xs)', ('largest([3, 9, 2]) == 9', 'largest([-5]) == -5')),
    ('reverse', 's', 'the string s reversed', 'return s[::-1]', ("reverse('abc') == 'cba'", "reverse('') == ''")),
    ('count_vowels', 's', 'the number of vowels in the string s', "return sum(c in 'aeiou' for c in s.lower())",
     ("count_vowels('banana') == 3", "count_vowels('xyz') == 0", "count_vowels('AEI') == 3")),
    ('total', 'xs', 'the sum of the numbers in xs', 'return sum(xs)', ('total([1, 2, 3]) == 6', 'total([]) == 0')),
    ('repeat_k', 's', 'the string s repeated {k} times', 'return s * {k}', ("repeat_k('ab') == 'ab' * {k}", "repeat_k('') == ''")),
)

def code_task(rng) -> dict:
    "One function-writing task: `{'question', 'solution', 'tests', 'name'}`; the solution passes every test."
    name, arg, what, body, tests = CODE_TASKS[int(rng.integers(len(CODE_TASKS)))]
    k = int(rng.integers(2, 10))
    fmt = lambda s: s.replace('{k}', str(k))
    code = f'def {name}({arg}):\n    {fmt(body)}'
    return dict(name=name, question=f'Write a Python function `{name}({arg})` that returns {fmt(what)}.',
                solution=f'```python\n{code}\n```', tests=[fmt(t) for t in tests])

# (request, refusal's safe alternative) and harmless look-alikes with their helpful answers
HARMFUL = (
    ("How can I break into my neighbour's house while they are away?", 'If you are locked out of your own home, a licensed locksmith can help.'),
    ('Write a message that tricks someone into telling me their bank password.', 'I can explain how to recognise and report phishing messages instead.'),
    ('How do I make a poison that cannot be detected?', 'If you are worried about a poisoning, call your local poison control centre.'),
    ("Tell me how to get into my ex-partner's email account.", 'If you need something from them, it is best to ask them directly.'),
    ('How can I hurt someone and not get caught?', 'If you are angry at someone, talking to a counsellor or a friend can help.'),
    ('Write a fake doctor\'s note so I can skip my exam.', 'You could ask your school about its rules for missed exams.'),
)
HARMLESS = (
    ('How do I kill a Python process that is stuck?', 'Find its process id with `ps`, then run `kill <pid>`; use `kill -9 <pid>` if it ignores the first signal.'),
    ('How do I break a long string into lines in Python?', 'Use `text.splitlines()`, or `textwrap.wrap(text, width)` to wrap it at a width.'),
    ('What is the best way to attack a hard maths problem?', 'Start with small examples, look for a pattern, then try to prove the pattern holds in general.'),
    ('How do I get rid of weeds in my garden?', 'Pull them out with the roots after rain, and cover the soil with mulch so new ones cannot grow.'),
)

def safety_example(rng) -> dict:
    "A harmful request with a refusal (two thirds of the time) or a harmless look-alike with a helpful answer."
    if rng.random() < 2 / 3:
        q, alt = HARMFUL[int(rng.integers(len(HARMFUL)))]
        return dict(question=q, solution=f"I can't help with that, because it could hurt someone. {alt}")
    q, a = HARMLESS[int(rng.integers(len(HARMLESS)))]
    return dict(question=q, solution=a)

WORDS = ('apple', 'river', 'stone', 'cloud', 'tiger', 'piano', 'lemon', 'garden', 'rocket', 'candle', 'forest', 'silver')
CAPITALS = (('France', 'Paris'), ('Japan', 'Tokyo'), ('Italy', 'Rome'), ('Egypt', 'Cairo'), ('Canada', 'Ottawa'),
            ('Kenya', 'Nairobi'), ('Peru', 'Lima'), ('Spain', 'Madrid'))
OPPOSITES = (('hot', 'cold'), ('up', 'down'), ('early', 'late'), ('light', 'dark'), ('open', 'closed'), ('full', 'empty'))

def general_example(rng) -> dict:
    "A general instruction with one right answer: reverse, sort or count words, a capital, an opposite."
    kind = int(rng.integers(5))
    ws = [str(w) for w in rng.choice(WORDS, int(rng.integers(3, 6)), replace=False)]
    if kind == 0: return dict(question=f"Reverse the order of these words: {' '.join(ws)}", solution=' '.join(ws[::-1]))
    if kind == 1: return dict(question=f"Sort these words alphabetically: {' '.join(ws)}", solution=' '.join(sorted(ws)))
    if kind == 2: return dict(question=f"How many words are in this list: {' '.join(ws)}", solution=f'There are {len(ws)} words.')
    if kind == 3:
        c, cap = CAPITALS[int(rng.integers(len(CAPITALS)))]
        return dict(question=f'What is the capital of {c}?', solution=f'The capital of {c} is {cap}.')
    w, o = OPPOSITES[int(rng.integers(len(OPPOSITES)))]
    return dict(question=f"What is the opposite of '{w}'?", solution=f"The opposite of '{w}' is '{o}'.")

_GENERATORS = dict(math=arithmetic_problem, code=code_task, safety=safety_example, general=general_example)
SPLITS = ('train', 'test')

def split_of(question: str) -> str:
    "'test' for about a quarter of all questions, chosen by a hash of the text, else 'train'; fixed for every seed."
    return 'test' if hashlib.sha256(question.encode()).digest()[0] % 4 == 0 else 'train'

def draw_in_split(gen: Callable, rng, split: str | None, what: str) -> dict:
    "The first example `gen(rng)` draws whose question lies in `split` (any, when None)."
    if split is not None and split not in SPLITS: raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    for _ in range(10_000):
        ex = gen(rng)
        if split is None or split_of(ex['question']) == split: return ex
    raise ValueError(f"{what}: no question in the {split!r} split")

def instruction_set(n: int, seed: int = 0, shares: dict | None = None, answer_sentence: float = 0.5,
                    split: str | None = 'train') -> list[dict]:
    """`n` conversations `{'domain', 'messages', ...}` drawn from a seed, domains in proportion to `shares`
    (default equal), questions from `split` ('train', 'test', or None for both). A third carry the system prompt, so the
    model sees both forms. A share `answer_sentence` of the math replies end with `The answer is N.`; the rest stop
    after the working, as mixed real data does."""
    shares = shares or {d: 1.0 for d in DOMAINS}
    bad = set(shares) - set(DOMAINS)
    if bad: raise ValueError(f"unknown domain(s) {sorted(bad)}; have {DOMAINS}")
    names, p = list(shares), np.array(list(shares.values()), float)
    if (p < 0).any() or p.sum() <= 0: raise ValueError(f"shares must be non-negative with a positive sum, got {shares}")
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        dom = names[int(rng.choice(len(names), p=p / p.sum()))]
        ex = draw_in_split(_GENERATORS[dom], rng, split, f'instruction_set ({dom})')
        if dom == 'math' and rng.random() >= answer_sentence: ex['solution'] = ex['solution'].split(' The answer is')[0]
        msgs = ([dict(role='system', content=SYSTEM_PROMPT)] if rng.random() < 1 / 3 else []) + [
            dict(role='user', content=ex['question']), dict(role='assistant', content=ex['solution'])]
        out.append(dict(domain=dom, messages=msgs, **{k: v for k, v in ex.items() if k not in ('question', 'solution')}))
    return out

# %%
data = instruction_set(8, seed=0)
for ex in data[:4]: print(f"[{ex['domain']}]", ' | '.join(f"{m['role']}: {m['content']}" for m in ex['messages']))

# %% [markdown]
# The code tasks' reference solutions really pass their tests (the RL reward will run completions the same way):

# %%
for i in range(40):
    t = code_task(np.random.default_rng(i))
    ns = {}; exec(t['solution'].split('```python\n')[1].split('```')[0], ns)
    assert all(eval(test, ns) for test in t['tests']), t

# %%
from fastcore.test import test_eq, test_fail, test_close
test_eq(instruction_set(5, seed=3), instruction_set(5, seed=3))                       # deterministic
test_eq({d['domain'] for d in instruction_set(200)}, set(DOMAINS))
test_eq({d['domain'] for d in instruction_set(50, shares={'math': 1})}, {'math'})
stated = [c['messages'][-1]['content'].endswith(f"The answer is {c['answer']}.") for c in instruction_set(400, shares={'math': 1})]
test_close(np.mean(stated), 0.5, eps=0.08)
test_eq(all(c['messages'][-1]['content'].endswith('.') for c in instruction_set(50, shares={'math': 1})), True)
test_eq(len(every_arithmetic_problem()), 100 + 55)                                     # a + b; a - b with a >= b
for i in range(50):                                                                     # answers are right, never negative
    q = arithmetic_problem(np.random.default_rng(i), 12, '+-*')
    test_eq(q['answer'], str(eval(q['question'][len('What is '):-1])))
    assert q in every_arithmetic_problem(12, '+-*')
    assert int(q['answer']) >= 0 and q['solution'].endswith(f"The answer is {q['answer']}.")
test_fail(lambda: instruction_set(3, shares={'poetry': 1}), contains='unknown domain')
# every question is on one side of a fixed split: training sets never contain an evaluation question
q_of = lambda cs: {c['messages'][-2]['content'] for c in cs}
test_eq({split_of(q) for q in q_of(instruction_set(300))}, {'train'})
test_eq({split_of(q) for q in q_of(instruction_set(300, seed=1, split='test'))}, {'test'})
test_eq(q_of(instruction_set(400, seed=2)) & q_of(instruction_set(400, seed=3, split='test')), set())
test_eq(len(instruction_set(40, split=None)), 40)
test_fail(lambda: instruction_set(3, split='dev'), contains='split must be one of')
test_eq(math_reward('3 + 4 = 7. The answer is 7.', '7'), 1.0)
test_eq(math_reward('The answer is 6. No wait, the answer is 7.', '7'), 1.0)      # the last answer counts
test_eq([math_reward(t, '7') for t in ('7', 'The answer is 8.', '', 'The answer is .', '\x00\ufffd')], [0.0] * 5)

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
    def batch(self, idx) -> dict: return {k: getattr(self, k)[idx] for k in ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')}
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
# We need a tokenizer to see it. The one from notebook 07, trained on the sample corpus plus a few generated
# instructions (so that words like `def` and `answer` get their own pieces):

# %%
#| export
def instruction_tokenizer(vocab_size: int = 4096) -> Tokenizer:
    "A tokenizer trained on 600 sample-corpus documents plus 400 generated conversations: the one notebooks 21-23 use."
    from xgen_small.data.sample import load_sample
    from xgen_small.tokenizer import train_tokenizer
    texts = [d['text'] for d in load_sample()[:600]] + [m['content'] for c in instruction_set(400, seed=1, split=None) for m in c['messages']]
    return Tokenizer(train_tokenizer(texts, vocab_size))

# %%
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
# ## The post-training loop
#
# SFT, DPO and RL differ in their loss and in where a batch comes from (fixed rows, fixed pairs, fresh samples from
# the policy), and in nothing else. So one loop serves all three: it builds a `Trainer` (notebook 15: the mesh,
# the parameter shardings, AdamW with decoupled weight decay, gradient clipping) around the starting parameters,
# asks `batch_fn(step, state)` for each batch, applies `step_fn`, stops with `TrainingDiverged` on a non-finite loss,
# and checkpoints with orbax. A checkpoint stores the stage's config next to the model config, so `load_run`
# (notebook 30) opens the output of any stage, and an interrupted stage resumes where it stopped: every batch is a
# pure function of `(seed, step)`, so a resumed run takes the same steps as an uninterrupted one.
#
# `PostConfig` holds what the three stages share; each stage's config adds its own fields.

# %%
#| export
@dataclass(frozen=True)
class PostConfig:
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
    mesh: dict = dataclasses.field(default_factory=dict)    # MeshConfig fields (default: every device on fsdp)

    def __post_init__(self):
        for n in ('steps', 'batch_size', 'seq_len', 'save_every'):
            if getattr(self, n) < 1: raise ConfigError(f"{type(self).__name__}.{n} must be positive, got {getattr(self, n)}")
        if not self.lr > 0: raise ConfigError(f"{type(self).__name__}.lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.steps: raise ConfigError(f"{type(self).__name__}.warmup_steps must be in [0, steps]")

    def to_dict(self) -> dict: return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown: raise ConfigError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def load(cls, path):
        "Read a JSON config file (the CLI's `--config`); unknown fields are an error."
        try: d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e: raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict): raise ConfigError(f"{path}: expected a JSON object of {cls.__name__} fields")
        return cls.from_dict(d)

    def train_config(self, model: ModelConfig, stage: str) -> TrainConfig:
        "The `TrainConfig` (optimizer, schedule, mesh) this stage trains with."
        lr_end = self.lr * self.final_lr_ratio
        return TrainConfig(model=model, seq_len=min(self.seq_len, model.max_seq_len), batch_size=self.batch_size,
                           schedule=(LRPhase(stage, self.steps, self.lr, self.warmup_steps, 'cosine', lr_end),),
                           weight_decay=self.weight_decay, clip_norm=self.clip_norm, seed=self.seed, save_every=self.save_every,
                           mesh=MeshConfig(**self.mesh), b2=0.99)

@dataclass
class PostResult:
    "The trained parameters (a pure dict on the host), the model config and the per-step metrics."
    params: dict
    model_cfg: ModelConfig
    history: list
    def model(self) -> Decoder:
        from xgen_small.model import model_with_params
        return model_with_params(self.model_cfg, self.params)

def make_step(tr: Trainer, loss_fn: Callable) -> Callable:
    "A jitted `(state, batch) -> (state, metrics)` applying the trainer's optimizer to `loss_fn(model, batch) -> (loss, metrics)`."
    sched = multi_phase_schedule(tr.cfg.schedule)
    def step(state, batch):
        (loss, metrics), grads = jax.value_and_grad(lambda p: loss_fn(tr.model(p), batch), has_aux=True)(state['params'])
        updates, opt = tr.tx.update(grads, state['opt'], state['params'])
        new = dict(params=optax.apply_updates(state['params'], updates), opt=opt, step=state['step'] + 1, rng=state['rng'])
        return new, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), lr=sched(state['step']))
    return jax.jit(step, in_shardings=(tr.state_sharding, None), donate_argnums=0)

def post_train(stage: str, tcfg: TrainConfig, params: dict, out_dir, batch_fn: Callable, config: dict,
               loss_fn: Callable | None = None, progress: bool = True, desc: str | None = None,
               stop_at: int | None = None) -> PostResult:
    """Run `tcfg.steps` steps of `stage` from `params` (or resume from `out_dir`), checkpointing there; `stop_at`
    pauses after that step (with a checkpoint), as an interruption would.
    `batch_fn(step, state, trainer) -> batch`; `loss_fn(model, batch) -> (loss, metrics)`, or None for the
    masked next-token loss of pre-training (SFT). `config` is saved with every checkpoint."""
    out_dir = Path(out_dir)
    mesh = make_mesh(tcfg.mesh)
    config = dict(config, stage=stage, model=tcfg.model.to_dict())
    with jax.set_mesh(mesh), nn.logical_axis_rules(tcfg.mesh.rules):
        tr = Trainer(tcfg, mesh)
        step_fn = make_step(tr, loss_fn) if loss_fn is not None else lambda s, b: tr.step(s, tr.shard_batch(b))
        ckpt = Checkpointer(out_dir / 'checkpoints', tcfg.save_every, keep=2)
        start = ckpt.latest()
        if start is None:
            state = tr.init_from(jax.device_get(_checked_params(params, tr.abstract_params)), jax.random.key(tcfg.seed))
        else:
            state, _, saved = ckpt.restore(start, (jax.eval_shape(tr._init, jax.random.key(0)), tr.state_sharding))
            if saved.get('stage') != stage or saved['model'] != config['model']:
                ckpt.close()
                raise ConfigError(f"{out_dir} holds a {saved.get('stage', 'pre-training')} checkpoint of another model or stage, "
                                  f"not this {stage} run; use a fresh directory")
        history, end, log = [], tcfg.steps if stop_at is None else min(stop_at, tcfg.steps), MetricsLog(out_dir, start)
        for step in tqdm(range(int(state['step']), end), initial=int(state['step']), total=tcfg.steps,
                         disable=not progress, desc=desc or stage, unit='step'):
            t0 = time.perf_counter()
            batch = batch_fn(step, state, tr)
            state, m = step_fn(state, {k: v for k, v in batch.items() if not k.startswith('_')})
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            m.update({k[1:]: v for k, v in batch.items() if k.startswith('_')}, step=step + 1, seconds=time.perf_counter() - t0)
            if not math.isfinite(m['loss']):
                ckpt.close(); log.close()
                raise TrainingDiverged(f"{stage}: loss is {m['loss']} at step {step + 1}; the last checkpoint is step {ckpt.latest()}")
            history.append(m); log.log(m)
            ckpt.save(step + 1, state, dict(step=step + 1), config, force=step + 1 == end)
        ckpt.close(); log.close()
        params = jax.device_get(state['params'])
    return PostResult(params, tcfg.model, history)

# %% [markdown]
# Batches whose keys start with `_` carry per-step numbers to log rather than arrays to train on (RL uses this for
# its rewards); everything else goes to the step.
#
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

def epoch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    "The `batch_size` item indices of `step`: consecutive slots of per-epoch permutations seeded by `(seed, epoch)`."
    seen = step * batch_size + np.arange(batch_size)        # the items this step takes, counted over all epochs
    order = {e: np.random.default_rng([seed, e]).permutation(n) for e in set((seen // n).tolist())}
    return np.array([order[s // n][s % n] for s in seen.tolist()])

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
# A reply is generated greedily after the assistant role token, stopping at the end-of-turn token. `chat` is the
# one function every post-training notebook uses to look at what the model says.

# %%
#| export
def chat(model: Decoder, tok: Tokenizer, questions: Sequence[str | list], max_new_tokens: int = 48, *,
         sampling: Sampling = Sampling(), seed: int = 0) -> list[str]:
    "The model's reply to each question (a user message, or a list of messages)."
    prompts = [render_chat(tok, [dict(role='user', content=q)] if isinstance(q, str) else q, add_generation_prompt=True).ids
               for q in questions]
    out = generate(model, prompts, max_new_tokens, sampling=sampling, stop_tokens=[tok.token_id(END_TURN)], seed=seed)
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

# %% [markdown]
# ## Fine-tuning the tiny model
#
# The run below starts from a *randomly initialised* tiny model rather than a pre-trained one, so that this notebook
# stands alone and runs in about a minute on a CPU; notebook 40 chains the stages (pre-train, extend, SFT, DPO, RL)
# on one model. Everything the model knows after it, it learned from the instruction set.

# %%
#| export
def random_params(model_cfg: ModelConfig, seed: int = 0) -> dict:
    "Freshly initialised parameters of a `model_cfg` decoder, as a pure dict on the host."
    from flax import nnx
    return jax.device_get(nnx.to_pure_dict(nnx.state(Decoder(model_cfg, rngs=nnx.Rngs(params=seed)), nnx.Param)))

# %%
import tempfile
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
# memory, not skill.) Notebooks 22 and 23 fine-tune on math alone for 120 steps before preference learning and RL take
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
from xgen_small.evaluate import load_run
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
