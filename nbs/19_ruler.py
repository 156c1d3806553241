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
# # RULER-style synthetic tasks
#
# > RULER-style tasks (needles, variable tracking, common and frequent words) at exact token lengths.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/19_ruler.ipynb)

# %%
#| default_exp ruler

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
# The xGen-small report measures long-context ability with RULER (Hsieh et al., 2024, arXiv 2404.06654), and its
# headline long-context claim is that RULER scores stay flat from 4K to 128K tokens. RULER is useful precisely because
# it is *synthetic*: every example is generated from a seed at an exact length, its answers are known, and the
# difficulty is controlled by construction (how many distractors, how many hops, how many values to collect).
# A plain needle-in-a-haystack test only asks "can the model copy one string from far away"; RULER adds the
# harder variants this notebook implements:
#
# | task | what sits in the haystack | what the model must return |
# |---|---|---|
# | `niah_single` | one `key -> value` needle | its value |
# | `niah_multikey` | the needle plus distractor needles with other keys | the value of the asked key only |
# | `niah_multivalue` | several needles with the *same* key | all of its values |
# | `niah_multiquery` | several needles, several keys asked at once | every asked value |
# | `vt` (variable tracking) | a chain `X1 = 12345`, `X2 = X1`, ... scattered in noise | every variable that ends up holding the value |
# | `cwe` (common words) | a long numbered word list, a few words far more frequent | the most common words |
# | `fwe` (frequent words) | "coded" words drawn from a Zipf distribution | the most frequent words |
#
# These tasks are the teaching version: our haystacks, needles and scoring, small enough to read. RULER's own
# thirteen tasks, built by its specification so that scores compare with published tables, are in notebook 32
# (`xgen_small.ruler_published`), and notebook 30 runs them through our evaluator and lm-evaluation-harness.
#
# Two choices are ours, and both are there so that a *base* model (no instruction tuning) can be evaluated, as
# RULER also does with its answer prefixes: each prompt ends with an answer prefix that the model continues, and
# for the needle tasks the prefix repeats the needle's own wording up to the value. Lengths are counted in *tokens
# of the model's tokenizer*: the prompt plus the answer budget is exactly `length`, so a model whose context is
# `length` can answer every example.

# %%
#| export
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from xgen_small.config import Config
from xgen_small.tokenizer import Tokenizer

# %% [markdown]
# ## Building blocks
#
# Keys are everyday nouns (as in RULER, whose keys are random words), values are random digit strings, and the
# haystack is either the classic passkey "noise" (Mohtashami & Jaggi, 2023: grass, sky, sun, repeated) or real text
# (RULER uses Paul Graham essays; we take any list of documents, e.g. the shipped sample corpus). Needles go in at
# sentence boundaries of the haystack, at depths spread uniformly at random. `RulerConfig.depth` narrows that
# window, for the classic needle-in-a-haystack sweep of depth against length (Kamradt, 2023): `depth=(0, 0.1)`
# puts every needle in the first tenth of the haystack, the farthest from the question.

# %%
#| export
NOISE = ' The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.'

KEY_WORDS = tuple('''apple anchor arrow badge banjo barrel basket beacon bridge bucket butter cabin camera candle
canyon carpet castle cedar chair cherry circle cloud clover comet copper corner cotton crane crown crystal
dagger desert diamond dragon drum eagle ember engine falcon feather fence fiddle forest fossil fountain garden
garlic glacier globe goblet granite grape harbor hammer helmet honey island ivory jacket jasmine jewel jungle
kettle kingdom ladder lantern lemon library lizard magnet maple marble meadow mirror monkey mountain needle
nickel oasis ocean olive orchid oyster paddle palace panther parrot pebble pepper piano pillow planet pocket
pony puzzle quartz rabbit radar raven ribbon river rocket saddle salmon sandal satchel scarf shadow shield
signal silver skate sparrow spider spoon squirrel statue summit sunset tablet teapot temple thunder tiger
timber tomato tower trumpet tulip tunnel turtle umbrella valley velvet violin walnut wagon whistle willow
window winter wizard wolf yacht zebra'''.split())

TASKS = ('niah_single', 'niah_multikey', 'niah_multivalue', 'niah_multiquery', 'vt', 'cwe', 'fwe')

@dataclass(frozen=True)
class RulerConfig(Config):
    "Difficulty knobs of the tasks (RULER's defaults where they fit a small model's vocabulary)."
    digits: int = 7              # length of each needle value
    n_distractors: int = 3       # niah_multikey: needles with other keys
    n_values: int = 4            # niah_multivalue: values under the one key
    n_queries: int = 4           # niah_multiquery: keys asked at once
    vt_hops: int = 4             # vt: assignments after the first, i.e. variables in the chain minus one
    cwe_common: int = 10         # cwe: how many frequent words to return
    cwe_common_freq: int = 30    # cwe: occurrences of each common word (scaled down when the length is short)
    cwe_rare_freq: int = 3       # cwe: occurrences of each rare word
    fwe_alpha: float = 2.0       # fwe: Zipf exponent
    fwe_top: int = 3             # fwe: how many frequent words to return
    haystack: str = 'noise'      # 'noise' or 'text' (documents passed to `make_sample`)
    depth: tuple = (
        0.0,
        1.0,
    )  # where needles may sit, as fractions of the haystack (0 = its start, farthest from the question)

    def __post_init__(self):
        for n in ('digits', 'n_distractors', 'n_values', 'n_queries', 'vt_hops', 'cwe_common', 'cwe_common_freq',
                  'cwe_rare_freq', 'fwe_top'):
            if getattr(self, n) < 1: raise ValueError(f"RulerConfig.{n} must be positive, got {getattr(self, n)}")
        if self.cwe_common_freq <= self.cwe_rare_freq:
            raise ValueError("RulerConfig.cwe_common_freq must exceed cwe_rare_freq")
        if self.haystack not in ('noise', 'text'):
            raise ValueError(f"RulerConfig.haystack must be 'noise' or 'text', got {self.haystack!r}")
        if len(self.depth) != 2 or not 0 <= self.depth[0] < self.depth[1] <= 1:
            raise ValueError(f"RulerConfig.depth must be (lo, hi) with 0 <= lo < hi <= 1, got {self.depth!r}")

@dataclass(frozen=True)
class RulerSample:
    "One example: the prompt's token ids (exactly `length - max_new_tokens`), the expected answers, the budget."
    task: str
    length: int
    seed: int
    input_ids: list
    answers: tuple
    max_new_tokens: int
    depths: tuple = ()           # relative position (0..1) of each needle in the prompt

# %% [markdown]
# The haystack is held as token ids together with the indices where a sentence ends, so that needles can be
# spliced in at boundaries without re-tokenising the whole context (tokenising 128K tokens of text for every
# example would dominate the cost of generating a suite).

# %%
#| export
class _Haystack:
    "Filler tokens with their sentence boundaries, repeated or drawn from documents, cut to any length."
    def __init__(self, tok: Tokenizer, texts=None):
        src = [NOISE] if not texts else [' ' + ' '.join(t.split()) for t in texts if t and t.strip()]
        if not src: raise ValueError("the text haystack needs at least one non-empty document")
        self.ids, ends = [], []
        for t in src:
            for sent in re.split(r'(?<=[.!?])\s+', t.strip()):
                if not sent: continue
                self.ids += tok.encode(' ' + sent)
                ends.append(len(self.ids))
        self.ends = np.asarray(ends)
        self.word_start = np.array(tok.starts_word(self.ids))

    def take(self, n: int, rng) -> tuple[list, np.ndarray]:
        "`n` filler tokens ending at a random sentence end, and the sentence ends within them."
        if n <= 0: return [], np.zeros(0, np.int64)
        # end on a full sentence (the question follows) and, where possible, start on a whole word
        ok = self.ends[self.word_start[(self.ends - n) % len(self.ids)]]
        stop = int(rng.choice(ok if len(ok) else self.ends))
        reps = -(-(n + len(self.ids)) // len(self.ids)) + 1
        ids = self.ids * reps
        stop += (reps - 1) * len(self.ids)
        ends = np.concatenate([self.ends + r * len(self.ids) for r in range(reps)]) - (stop - n)
        return ids[stop - n:stop], ends[(ends > 0) & (ends <= n)]

_NOISE: dict = {}

def _noise_haystack(tok: Tokenizer) -> _Haystack:
    "The noise haystack of `tok`, tokenised once (every needle example and training document shares it)."
    if tok.fingerprint not in _NOISE: _NOISE[tok.fingerprint] = _Haystack(tok)
    return _NOISE[tok.fingerprint]

def noise_tokens(tok: Tokenizer, n: int) -> list:
    "`n` tokens of the repeated noise text."
    ids = _noise_haystack(tok).ids
    return (ids * (n // len(ids) + 1))[:n]

def _splice(filler: list, ends: np.ndarray, needles: list[list], rng, depth=(0.0, 1.0)) -> tuple[list, list]:
    """Insert each needle at a random sentence boundary of `filler` (in order) between fractions `depth` of it
    (the nearest boundary when that window holds none); returns the ids and each needle's start."""
    cand = np.concatenate([[0], ends])  # every boundary lies in [0, len(filler)]: (0, 1) keeps them all
    lo, hi = depth[0] * len(filler), depth[1] * len(filler)
    inside = cand[(cand >= lo) & (cand <= hi)]
    cand = inside if len(inside) else cand[[int(np.argmin(np.abs(cand - (lo + hi) / 2)))]]
    cuts = np.sort(rng.choice(cand, size=len(needles), replace=True))
    out, starts, prev = [], [], 0
    for c, nd in zip(cuts, needles):
        out += filler[prev:c]; starts.append(len(out)); out += nd; prev = int(c)
    return out + filler[prev:], starts

def _value(rng, digits: int) -> str:
    return str(rng.integers(1, 10)) + ''.join(map(str, rng.integers(0, 10, digits - 1)))

# %% [markdown]
# ## The tasks
#
# Every generator follows the same shape: draw the keys and values from the seed, turn them into needles, work out
# how many filler tokens are left once the instruction, needles and question are counted, splice, and check the
# result is exactly the requested length. A length too short to hold the task is an error that says how many
# tokens the task needs, never a silently shorter example.

# %%
#| export
_INTRO = {
    'niah': 'Some special magic numbers are hidden inside the following text. Make sure to memorize them.',
    'vt': 'Memorize and track the chain(s) of variable assignment hidden in the following text.',
    'cwe': 'Below is a numbered list of words. In these words, some appear more often than others.',
    'fwe': 'Read the following coded text and track the frequency of each coded word.',
}

def _needle(key, value): return f' The special magic number for {key} is: {value}.'

def _niah(tok, rng, cfg, task):
    n_keys = {'niah_single': 1, 'niah_multikey': 1 + cfg.n_distractors, 'niah_multivalue': 1,
              'niah_multiquery': cfg.n_queries}[task]
    keys = [str(k) for k in rng.choice(KEY_WORDS, n_keys, replace=False)]
    if task == 'niah_multivalue':
        values = [_value(rng, cfg.digits) for _ in range(cfg.n_values)]
        needles = [(keys[0], v) for v in values]
        asked, answers = keys[:1], values
    else:
        needles = [(k, _value(rng, cfg.digits)) for k in keys]
        asked = keys[:1] if task != 'niah_multiquery' else keys
        answers = [v for k, v in needles if k in asked]
    order = rng.permutation(len(needles))
    needles = [needles[i] for i in order]
    if task == 'niah_multivalue':
        q = f' What are all the special magic numbers for {asked[0]}? The special magic numbers for {asked[0]} are:'
    elif len(asked) == 1:
        q = f' What is the special magic number for {asked[0]}? The special magic number for {asked[0]} is:'
    else:
        q = f' What are the special magic numbers for {", ".join(asked)}? The special magic numbers are:'
    per = cfg.digits + 2                      # a value plus a separator, tokens (digits are split one per token)
    return _INTRO['niah'], [tok.encode(_needle(k, v)) for k, v in needles], q, answers, per * len(answers) + 2

def _var_name(rng) -> str: return ''.join(chr(c) for c in rng.integers(65, 91, 5))

def _vt(tok, rng, cfg):
    value = _value(rng, 5)
    names = []
    while len(names) < cfg.vt_hops + 1:
        n = _var_name(rng)
        if n not in names: names.append(n)
    stmts = [f' VAR {names[0]} = {value}.'] + [f' VAR {b} = VAR {a}.' for a, b in zip(names, names[1:])]
    q = (f' Question: Find all variables that are assigned the value {value} in the text above.'
         ' Answer: According to the chain(s) of variable assignment in the text above,'
         f' {len(names)} variables are assigned the value {value}, they are:')
    return (
        _INTRO['vt'],
        [tok.encode(s) for s in stmts],
        q,
        names,
        len(tok.encode(' ' + ', '.join(names) + '.')) + 2,
    )  # room for every name

def _word_list(tok, words, budget, rng):
    "A numbered list ' 1. w 2. w ...' of `words` in random order, as ids; None if it exceeds `budget` tokens."
    words = [words[i] for i in rng.permutation(len(words))]
    ids = tok.encode(''.join(f' {i + 1}. {w}' for i, w in enumerate(words)))
    return ids if len(ids) <= budget else None

def _cwe(tok, rng, cfg, budget):
    """The list that fills `budget`: `cwe_common` words `f` times each plus rare words `cwe_rare_freq` times each,
    `f` lowered from `cwe_common_freq` until at least as many rare words as common ones fit."""
    pool = [str(w) for w in rng.permutation(KEY_WORDS)]
    common, rare_pool = pool[:cfg.cwe_common], pool[cfg.cwe_common:]
    while len(rare_pool) * cfg.cwe_rare_freq * 3 < budget:                # long contexts need more word types
        w = ''.join(chr(c) for c in rng.integers(97, 123, 6))
        if w not in rare_pool and w not in common: rare_pool.append(w)
    seed = int(rng.integers(1 << 31))
    for f in range(cfg.cwe_common_freq, cfg.cwe_rare_freq, -1):
        lo, hi, best = 0, len(rare_pool), None
        while lo <= hi:                                             # most rare words that still fit, by bisection
            mid = (lo + hi) // 2
            ids = _word_list(tok, common * f + rare_pool[:mid] * cfg.cwe_rare_freq, budget, np.random.default_rng(seed))
            if ids is None: hi = mid - 1
            else: best, lo = (ids, mid), mid + 1
        if best is not None and best[1] >= cfg.cwe_common: break
    if best is None or best[1] < cfg.cwe_common:
        raise ValueError(f"cwe: {budget} tokens cannot hold {cfg.cwe_common} common and {cfg.cwe_common} rare words")
    best = best[0]
    q = (f' Question: What are the {cfg.cwe_common} most common words in the above list?'
         f' Answer: The top {cfg.cwe_common} words that appear most often in the list are:')
    return best, q, common

def _fwe(tok, rng, cfg, budget, tries: int = 20):
    """Coded words drawn from Zipf(`fwe_alpha`) over a small vocabulary until `budget` tokens are used; redrawn (from
    the same generator, so still a function of the seed) while the top `fwe_top` words tie with the next."""
    vocab = []
    while len(vocab) < 32:
        w = ''.join(chr(c) for c in rng.integers(97, 123, 5))
        if w not in vocab: vocab.append(w)
    for _ in range(tries):
        rank = rng.zipf(cfg.fwe_alpha, 4 * budget)
        words = [vocab[r - 1] for r in rank if r <= len(vocab)]
        lo, hi, best = 1, len(words), None
        while lo <= hi:
            mid = (lo + hi) // 2
            ids = tok.encode(' ' + ' '.join(words[:mid]) + ' ...')
            if len(ids) <= budget: best, lo = (ids, mid), mid + 1
            else: hi = mid - 1
        if best is None: raise ValueError(f"fwe: {budget} tokens cannot hold even one coded word")
        ids, n = best
        counts = {}
        for w in words[:n]: counts[w] = counts.get(w, 0) + 1
        ranked = sorted(counts, key=lambda w: (-counts[w], vocab.index(w)))
        if len(ranked) <= cfg.fwe_top or counts[ranked[cfg.fwe_top - 1]] > counts[ranked[cfg.fwe_top]]: break
    else: raise ValueError(f"fwe: the top words tied in {tries} draws at this length; use a longer length")
    q = (f' Question: What are the {cfg.fwe_top} most frequently appeared words in the above coded text?'
         f' Answer: According to the coded text above, the {cfg.fwe_top} most frequently appeared words are:')
    return ids, q, ranked[:cfg.fwe_top]

# %% [markdown]
# `make_sample` is the one entry point. The random generator is seeded from `(seed, task, length)`, so an example is
# a pure function of those three numbers and of the tokenizer: the same seed gives the same haystack, depths, keys
# and values on every machine, and suites at different lengths are independent draws.
#
# Each sample's answer budget (`max_new_tokens`) is what its longest right answer takes in *this* tokenizer, plus the
# stop: `tests/test_oracles.py` drives every task with an oracle model that emits the right answer through the real
# generator, and requires 100%. (A fixed three tokens per name once cut off variable-tracking answers, whose random
# five-letter names take up to five tokens, so even a perfect model scored 0 there.)

# %%
#| export
def make_sample(tok: Tokenizer, task: str, length: int, seed: int = 0, cfg: RulerConfig = RulerConfig(),
                texts=None) -> RulerSample:
    "One `task` example whose prompt plus answer budget is exactly `length` tokens of `tok`."
    if task not in TASKS: raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if cfg.haystack == 'text' and not texts:
        raise ValueError("RulerConfig.haystack='text' needs `texts` (documents for the haystack)")
    rng = np.random.default_rng([seed, TASKS.index(task), length])
    hay = _Haystack(tok, texts) if cfg.haystack == 'text' else _noise_haystack(tok)
    if task in ('cwe', 'fwe'):
        intro = tok.encode(_INTRO[task])
        # room for the longest answer: cwe's words come from KEY_WORDS; fwe's are 5 random letters (at most a token
        # a letter), each with its space and comma
        per_word = max(len(tok.encode(f' {w},')) for w in KEY_WORDS) if task == 'cwe' else 7
        budget_answer = per_word * (cfg.cwe_common if task == 'cwe' else cfg.fwe_top) + 4
        q_len = len(
            tok.encode(
                ' Question: What are the 10 most frequently appeared words in the above coded text? Answer: According '
                'to the coded text above, the 10 most frequently appeared words are:'
            )
        )
        room = length - budget_answer - len(intro) - q_len
        if room < 8:
            raise ValueError(f"{task}: length {length} is too short (needs more than {length - room + 8} tokens)")
        body, q, answers = (_cwe if task == 'cwe' else _fwe)(tok, rng, cfg, room)
        q_ids = tok.encode(q)
        pad, _ = hay.take(length - budget_answer - len(intro) - len(body) - len(q_ids), rng)   # top up with noise
        ids, depths = intro + body + pad + q_ids, ()
    else:
        intro, needles, q, answers, budget_answer = (
            _niah(tok, rng, cfg, task) if task.startswith('niah') else _vt(tok, rng, cfg)
        )
        intro, q_ids = tok.encode(intro), tok.encode(q)
        n_fill = length - budget_answer - len(intro) - len(q_ids) - sum(map(len, needles))
        if n_fill < 0:
            raise ValueError(f"{task}: length {length} is too short; this task needs at least {length - n_fill} tokens")
        filler, ends = hay.take(n_fill, rng)
        body, starts = _splice(filler, ends, needles, rng, cfg.depth)
        ids = intro + body + q_ids
        depths = tuple(round((len(intro) + s) / len(ids), 4) for s in starts)
    if len(ids) != length - budget_answer:
        raise AssertionError(f"{task}: built {len(ids)} tokens, wanted {length - budget_answer}")
    return RulerSample(task, length, seed, ids, tuple(answers), budget_answer, depths)

# %% [markdown]
# ## Scoring
#
# RULER scores with string matching: an answer counts if it appears in the model's output. We match whole words
# (so `1234` inside `91234` is *not* a hit) case-insensitively, and report two numbers per example: `exact`, 1 when
# every expected answer is present (the strict score this project reports), and `recall`, the fraction present
# (RULER's `string_match_all`, partial credit).

# %%
#| export
_WORD = re.compile(r'[A-Za-z0-9]+')

def score(sample: RulerSample, prediction: str) -> dict:
    "`exact` (all answers found, 0/1) and `recall` (fraction found) of `prediction` for `sample`."
    found = set(w.lower() for w in _WORD.findall(prediction))
    hits = [str(a).lower() in found for a in sample.answers]
    return dict(exact=float(all(hits)), recall=sum(hits) / len(hits))

def answer_text(sample: RulerSample) -> str:
    "The reference continuation of `sample`'s prompt: its answers, comma-separated, closed by a full stop."
    return ' ' + ', '.join(map(str, sample.answers)) + '.'

def training_document(
    tok: Tokenizer, task: str, length: int, seed: int, cfg: RulerConfig = RulerConfig(), texts=None
) -> list:
    "A synthetic retrieval document for training: a `task` prompt of about `length` tokens followed by its answer."
    s = make_sample(tok, task, length, seed, cfg, texts)
    return s.input_ids + tok.encode(answer_text(s))

def make_suite(tok: Tokenizer, tasks=TASKS, lengths=(256, 512), n: int = 10, seed: int = 0,
               cfg: RulerConfig = RulerConfig(), texts=None) -> list[RulerSample]:
    "`n` samples of every task at every length (seeds `seed .. seed + n - 1`)."
    return [make_sample(tok, t, L, seed + i, cfg, texts) for t in tasks for L in lengths for i in range(n)]

# %% [markdown]
# ## Examples
#
# We need a tokenizer; the one trained in notebook 07 on the sample corpus is quick to rebuild.

# %%
from xgen_small.data.sample import load_sample
from xgen_small.tokenizer import train_tokenizer
docs = load_sample()
tok = Tokenizer(train_tokenizer([d['text'] for d in docs[:600]], 4096))
s = make_sample(tok, 'niah_single', 256, seed=0)
print(len(s.input_ids), '+', s.max_new_tokens, '=', s.length, '| answers', s.answers, '| needle at depth', s.depths)
print(tok.decode(s.input_ids))

# %% [markdown]
# Every task at 1024 tokens, the answers and where the needles sit (`depths`, fraction of the prompt):

# %%
for t in TASKS:
    s = make_sample(tok, t, 1024, seed=1)
    print(f'{t:>16}  prompt {len(s.input_ids)}  answers {list(s.answers)}  depths {list(s.depths)}')
print()
print(tok.decode(make_sample(tok, 'vt', 1024, seed=1).input_ids)[-400:])
print(tok.decode(make_sample(tok, 'cwe', 1024, seed=1).input_ids)[:300], '...')

# %% [markdown]
# The same task with its needles confined by `RulerConfig.depth`. The window is in haystack tokens, while `depths`
# are fractions of the whole prompt, which also holds the instruction and the earlier needles, so they drift a
# little outside it:

# %%
for window in ((0.0, 0.1), (0.45, 0.55), (0.9, 1.0)):
    ds = [make_sample(tok, 'niah_multikey', 2048, seed=i, cfg=RulerConfig(depth=window)).depths for i in range(3)]
    print(f'depth window {window}: needle depths {ds}')

# %% [markdown]
# The haystack can be real text instead of noise; here the sample corpus, as RULER uses essays:

# %%
s = make_sample(tok, 'niah_multikey', 384, seed=2, cfg=RulerConfig(haystack='text'), texts=[d['text'] for d in docs[:50]])
print(tok.decode(s.input_ids)[:600], '...')

# %% [markdown]
# Examples are exact in length at any size (here up to 16K tokens) and cheap to make, because only the needles
# and question are tokenised per example:

# %%
import time
for L in (1024, 4096, 16384):
    t0 = time.perf_counter()
    suite = make_suite(tok, lengths=(L,), n=2)
    print(f'{L:>6} tokens: {len(suite)} samples in {time.perf_counter() - t0:.2f}s')

# %%
from fastcore.test import test_eq, test_fail, test_ne
for t in TASKS:
    for L in (1000, 2048, 4096):
        s = make_sample(tok, t, L, seed=3)
        test_eq(len(s.input_ids) + s.max_new_tokens, L)                               # exact length
        test_eq(make_sample(tok, t, L, seed=3), s)                                     # deterministic
        test_ne(make_sample(tok, t, L, seed=4).input_ids, s.input_ids)                 # seed matters
        text = tok.decode(s.input_ids)
        if t.startswith('niah') or t == 'vt':
            for a in s.answers: assert str(a) in text, (t, a)                          # every answer is in the context
            assert all(0 <= d < 1 for d in s.depths)
# needles are spread over the whole context across seeds
d = [make_sample(tok, 'niah_single', 1024, seed=i).depths[0] for i in range(40)]
assert min(d) < 0.2 and max(d) > 0.8, d
# `RulerConfig.depth` confines them (here to the first quarter of the haystack); the default draws match the unconfined ones
far = RulerConfig(depth=(0.0, 0.25))
d = [make_sample(tok, t, 2048, seed=i, cfg=far).depths for t in ('niah_single', 'niah_multikey', 'vt') for i in range(10)]
assert all(x < 0.3 for ds in d for x in ds), d
test_eq(make_sample(tok, 'niah_single', 1024, seed=3, cfg=RulerConfig(depth=(0.0, 1.0))), make_sample(tok, 'niah_single', 1024, seed=3))
test_fail(lambda: RulerConfig(depth=(0.5, 0.5)), contains='RulerConfig.depth')
# multi-key: distractors present, only the asked key's value is the answer
s = make_sample(tok, 'niah_multikey', 1024, seed=5)
test_eq(len(s.answers), 1); test_eq(tok.decode(s.input_ids).count('The special magic number for'), 4 + 1)
test_eq(len(make_sample(tok, 'niah_multivalue', 1024, seed=5).answers), 4)
test_eq(len(make_sample(tok, 'niah_multiquery', 1024, seed=5).answers), 4)
# vt: the chain is complete and in order of assignment
s = make_sample(tok, 'vt', 1024, seed=6); text = tok.decode(s.input_ids)
for a, b in zip(s.answers, s.answers[1:]): assert f'VAR {b} = VAR {a}.' in text
# cwe: the answers really are the most common words of the list
s = make_sample(tok, 'cwe', 2048, seed=7); words = re.findall(r'\d+\. (\w+)', tok.decode(s.input_ids))
counts = {w: words.count(w) for w in set(words)}
assert min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
# fwe: likewise for the coded words
s = make_sample(tok, 'fwe', 2048, seed=7); body = tok.decode(s.input_ids).split('coded word.')[1].split('...')[0].split()
counts = {w: body.count(w) for w in set(body)}
assert min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in s.answers)

# %% [markdown]
# Scoring, and the errors bad requests get:

# %%
s = make_sample(tok, 'niah_multiquery', 512, seed=0)
test_eq(score(s, ' '.join(s.answers)), dict(exact=1.0, recall=1.0))
test_eq(score(s, ' '.join(s.answers[:2]))['recall'], 0.5)
test_eq(score(s, ' '.join(s.answers[:2]))['exact'], 0.0)
one = make_sample(tok, 'niah_single', 512, seed=0)
test_eq(score(one, f' {one.answers[0]}.'), dict(exact=1.0, recall=1.0))
test_eq(score(one, f' 9{one.answers[0]}.')['exact'], 0.0)       # whole words only
test_eq(score(one, '')['exact'], 0.0)
test_fail(lambda: make_sample(tok, 'niah_single', 40), contains='too short')
test_fail(lambda: make_sample(tok, 'cwe', 256), contains='cwe')
test_fail(lambda: make_sample(tok, 'passkey', 512), contains='unknown task')
test_fail(lambda: make_sample(tok, 'niah_single', 512, cfg=RulerConfig(haystack='text')), contains='needs `texts`')
test_fail(lambda: RulerConfig(digits=0), contains='digits')

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
