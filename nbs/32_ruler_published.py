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
# # RULER as published
#
# > RULER's thirteen tasks by its own specification: haystacks, key and value types, counts, answer prefixes, scoring.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/32_ruler_published.ipynb)

# %%
#| default_exp ruler_published

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
# Notebook 19's tasks teach what RULER measures, with our own haystacks, needles and scoring. A score from them
# cannot be put beside a published RULER table: RULER's numbers depend on exactly how its examples are built
# (which haystack, how many needles of which type, how the answer is asked for) and how answers are scored.
# This module builds the thirteen tasks of RULER's task table (`scripts/synthetic.yaml` in NVIDIA/RULER; Hsieh et
# al., 2024, arXiv 2404.06654) by that specification:
#
# | task | haystack | keys / values | needles (keys x values, queried) | answer |
# |---|---|---|---|---|
# | `niah_single_1` | noise | words / 7-digit numbers | 1 x 1, 1 | the value |
# | `niah_single_2` | essay | words / numbers | 1 x 1, 1 | the value |
# | `niah_single_3` | essay | words / UUIDs | 1 x 1, 1 | the value |
# | `niah_multikey_1` | essay | words / numbers | 4 x 1, 1 | the asked key's value |
# | `niah_multikey_2` | needles | words / numbers | 1 x 1 among distractor needles | the value |
# | `niah_multikey_3` | needles | UUIDs / UUIDs | 1 x 1 among distractor needles | the value |
# | `niah_multivalue` | essay | words / numbers | 1 x 4, 1 | all four values |
# | `niah_multiquery` | essay | words / numbers | 4 x 1, 4 | all four values |
# | `vt` | noise | one chain of 4 hops, 5-letter names, 5-digit value | one worked example first | all 5 names |
# | `cwe` | numbered word list | 10 common words x 30, others x 3 (x 6 / x 1 below 4K tokens) | one worked example | the 10 common words |
# | `fwe` | coded text | 6-letter words drawn by Zipf (alpha 2), top word replaced by `...` | | the 3 most frequent |
# | `qa_1` / `qa_2` | SQuAD / HotpotQA documents | golden documents among distractors | | any reference answer |
#
# Every prompt ends with an answer prefix the model continues (so base models can be scored) and is sized, by
# binary search over the haystack, so that its tokens plus the task's generation budget (128 / 30 / 120 / 50 / 32
# tokens) fit the target length. Scoring is RULER's: an answer is right for a reference when the reference occurs
# in it, case-insensitively; `string_match_all` averages that over a sample's references (every needle value must
# be there), `string_match_part` takes the best one (any reference answer of a QA question will do).
#
# **What is ours, and what you may bring.** The *wording* of the instructions, questions and answer prefixes is our
# own; RULER's exact wording lives in its `scripts/data/synthetic/constants.py`, which `load_templates` reads (it
# parses the file, it does not run it), so a run whose numbers must sit beside published ones uses RULER's words.
# Key words come from the same word lists RULER draws from (the `wonderwords` package: adjective-noun keys, and
# nouns, adjectives and verbs for the common-words list). Essays (RULER uses Paul Graham's) and the SQuAD and HotpotQA
# files are the user's to supply; nothing is downloaded. Deviations, each small and deliberate:
#
# - essays are split into sentences by a rule (a full stop, question or exclamation mark, then space and a capital,
#   digit or quote) rather than by nltk's punkt model, which would have to be downloaded;
# - distractor needles never reuse a real key (RULER does not check; a repeat would make a question ambiguous);
# - the variable-tracking worked example is 500 tokens as in RULER, or a quarter of the length below 2,000 tokens
#   (just the chain, when even one noise sentence is too many),
#   and the common-words list grows past the word lists with more adjective-noun words, not RULER's extra list;
# - the random generator is ours (seeded per task, length and sample), so the examples are RULER's *distribution*,
#   not its exact files.

# %%
#| export
from __future__ import annotations

import ast
import heapq
import json
import random
import re
import string
import uuid
import zlib
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np

# %% [markdown]
# ## The task table and the templates

# %%
#| export
TASKS = {
    'niah_single_1': ('niah', dict(haystack='noise', key='words', value='numbers', keys=1, values=1, queries=1)),
    'niah_single_2': ('niah', dict(haystack='essay', key='words', value='numbers', keys=1, values=1, queries=1)),
    'niah_single_3': ('niah', dict(haystack='essay', key='words', value='uuids', keys=1, values=1, queries=1)),
    'niah_multikey_1': ('niah', dict(haystack='essay', key='words', value='numbers', keys=4, values=1, queries=1)),
    'niah_multikey_2': ('niah', dict(haystack='needle', key='words', value='numbers', keys=1, values=1, queries=1)),
    'niah_multikey_3': ('niah', dict(haystack='needle', key='uuids', value='uuids', keys=1, values=1, queries=1)),
    'niah_multivalue': ('niah', dict(haystack='essay', key='words', value='numbers', keys=1, values=4, queries=1)),
    'niah_multiquery': ('niah', dict(haystack='essay', key='words', value='numbers', keys=1, values=1, queries=4)),
    'vt': ('variable_tracking', dict(haystack='noise', chains=1, hops=4)),
    'cwe': ('common_words_extraction', dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    'fwe': ('freq_words_extraction', dict(alpha=2.0)),
    'qa_1': ('qa', dict(dataset='squad')),
    'qa_2': ('qa', dict(dataset='hotpotqa')),
}
SYNTHETIC = tuple(t for t, (family, _) in TASKS.items() if family != 'qa')
NEEDS_ESSAYS = tuple(t for t, (_, a) in TASKS.items() if a.get('haystack') == 'essay')
METRIC = {family: ('part' if family == 'qa' else 'all') for family, _ in TASKS.values()}

NOISE = 'The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.'
NEEDLE = 'One of the special magic {type_needle_v} for {key} is: {value}.'
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40))]       # the 40 depths (percent) needles go in at

@dataclass(frozen=True)
class Template:
    "A task family's prompt (`{context}`, `{query}` and the family's other fields) and the answer prefix after it."
    template: str
    answer_prefix: str
    tokens_to_generate: int

TEMPLATES = {
    'niah': Template(
        'Some special magic {type_needle_v} are hidden in the text below. Read it closely: you will be asked to '
        'recall the {type_needle_v} of one key.\n{context}\nWhat are all the special magic {type_needle_v} for '
        '{query} in the text above?',
        ' The special magic {type_needle_v} for {query} in the text above are', 128),
    'variable_tracking': Template(
        'Follow the chain(s) of variable assignments hidden in the text below.\n\n{context}\nQuestion: Which '
        'variables hold the value {query} in the text above?',
        ' Answer: Following the assignments in the text above, {num_v} variables hold the value {query}:', 30),
    'common_words_extraction': Template(
        'Below is a numbered list of words, some of which occur more often than others. Remember the most frequent '
        'ones.\n{context}\nQuestion: Which {num_cw} words occur most often in the list above?',
        ' Answer: The {num_cw} most frequent words in the list are:', 120),
    'freq_words_extraction': Template(
        'Read the coded text below and count how often each coded word occurs; you will be asked for the three most '
        "frequent ones. {context}\nQuestion: Without explanation, and ignoring the dots '....', which three coded "
        'words occur most often in the coded text above?',
        ' Answer: The three most frequent coded words in the text above are:', 50),
    'qa': Template(
        'Answer the question from the documents below, with the answer alone and no other words.\n\nDocuments:\n\n'
        '{context}\n\nAnswer the question from the documents above, with the answer alone and no other words.\n\n'
        'Question: {query}',
        ' Answer:', 32),
}
_FIELDS = {'niah': {'context', 'query', 'type_needle_v'}, 'variable_tracking': {'context', 'query', 'num_v'},
           'common_words_extraction': {'context', 'query', 'num_cw'}, 'freq_words_extraction': {'context', 'query'},
           'qa': {'context', 'query'}}

def _check_template(family: str, t: Template, source: str = 'template'):
    "Every placeholder is one the family fills, and `{context}` (and `{query}` where it is the question) are there."
    for part in (t.template, t.answer_prefix):
        names = {f for _, f, _, _ in string.Formatter().parse(part) if f is not None}
        unknown = names - _FIELDS[family]
        if unknown:
            raise ValueError(
                f"{source}: the {family} template uses {sorted(unknown)}; it may use {sorted(_FIELDS[family])}"
            )
    needed = {'context'} | ({'query'} if family in ('niah', 'variable_tracking', 'qa') else set())
    missing = {f for f in needed if '{' + f + '}' not in t.template}
    if missing: raise ValueError(f"{source}: the {family} template has no {sorted(missing)}")
    if t.tokens_to_generate < 1: raise ValueError(f"{source}: {family} tokens_to_generate must be positive")

def load_templates(path) -> dict[str, Template]:
    """Templates from a file: RULER's `scripts/data/synthetic/constants.py` (its `TASKS = {...}` literal is parsed,
    never run) or a JSON file of the same shape, `{family: {template, answer_prefix, tokens_to_generate}}`. Families
    the file leaves out keep ours."""
    p = Path(path)
    if not p.is_file(): raise FileNotFoundError(f"no template file at {p}")
    if p.suffix == '.py':
        found = [n.value for n in ast.parse(p.read_text()).body if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == 'TASKS' for t in n.targets)]
        if not found:
            raise ValueError(
                f"{p}: no `TASKS = {{...}}` assignment (RULER's scripts/data/synthetic/constants.py has one)"
            )
        try: table = ast.literal_eval(found[-1])
        except ValueError as e: raise ValueError(f"{p}: TASKS is not a plain literal ({e})") from None
    else:
        table = json.loads(p.read_text())
    out = dict(TEMPLATES)
    for family, spec in table.items():
        if family not in TEMPLATES:
            raise ValueError(f"{p}: unknown task family {family!r}; RULER's are {sorted(TEMPLATES)}")
        if not isinstance(spec, dict) or 'template' not in spec:
            raise ValueError(f"{p}: {family} needs at least a 'template'")
        t = Template(spec['template'], spec.get('answer_prefix', ''),
                     int(spec.get('tokens_to_generate', TEMPLATES[family].tokens_to_generate)))
        _check_template(family, t, str(p))
        out[family] = t
    return out

for _family, _t in TEMPLATES.items(): _check_template(_family, _t)

# %% [markdown]
# One quirk of the specification is kept on purpose: a needle task with a single answer turns its plural wording
# singular by plain replacement (`Some` -> `A`, `are all` -> `is`, `are` -> `is`, `answers` -> `answer`, and
# `numbers` -> `number`), on RULER's templates and on ours alike. Our wording is written so that the replacement
# reads correctly (it avoids words that contain "are").

# %%
#| export
def _singular(text: str) -> str:
    return text.replace('Some', 'A').replace('are all', 'is').replace('are', 'is').replace('answers', 'answer')

# %% [markdown]
# ## Keys, values and haystacks

# %%
#| export
@cache
def _words() -> dict[str, tuple]:
    "wonderwords' noun, adjective and verb lists, the vocabulary RULER's keys and word lists come from."
    import warnings
    with warnings.catch_warnings():           # wonderwords 2.2 reads its lists with a deprecated importlib call
        warnings.simplefilter('ignore', DeprecationWarning)
        import wonderwords
        r = wonderwords.RandomWord()
        return {c: tuple(sorted(set(r.filter(include_categories=[c])))) for c in ('noun', 'adjective', 'verb')}

def _random(kind: str, rng: random.Random) -> str:
    "A random key or value: an adjective-noun word, a 7-digit number or a version-4 UUID."
    if kind == 'numbers': return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == 'words': w = _words(); return f"{rng.choice(w['adjective'])}-{rng.choice(w['noun'])}"
    if kind == 'uuids': return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown key/value type {kind!r}")

def split_sentences(text: str) -> list[str]:
    "Sentences of `text`: a break after `.`, `?` or `!` (and closing quotes), then space and a capital, digit or quote."
    return [s for s in re.split(r'(?:(?<=[.!?])|(?<=[.!?]["\')\]]))\s+(?=["\'(\[A-Z0-9])', text.strip()) if s]

def load_essays(source) -> list[str]:
    """The essay haystack as words: RULER's `PaulGrahamEssays.json` (`{"text": ...}`), a `.txt` file, a directory of
    them, or a list of texts. Whitespace runs become single spaces, as RULER does."""
    if isinstance(source, (list, tuple)): text = ' '.join(source)
    else:
        p = Path(source)
        if p.is_dir(): text = ' '.join(f.read_text() for f in sorted(p.glob('*.txt')))
        elif p.suffix == '.json': text = json.loads(p.read_text())['text']
        elif p.is_file(): text = p.read_text()
        else: raise FileNotFoundError(f"no essays at {p}")
    words = re.sub(r'\s+', ' ', text).strip().split(' ')
    if len(words) < 100:
        raise ValueError(f"the essay haystack has {len(words)} words; it needs real text (RULER: Paul Graham's essays)")
    return words

def _essay_text(words: list[str], n: int) -> str:
    "The first `n` words of the essays, repeated when `n` is larger (as RULER does)."
    return ' '.join((words * (-(-n // len(words))))[:n])

def _insert_at_depths(sentences: list[str], items: list[str], rng: random.Random) -> str:
    "Put `items` (in order) between sentences at distinct depths drawn from RULER's 40, and join with spaces."
    cuts = [0] + sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(items))) + [len(sentences)]
    parts = []
    for i in range(1, len(cuts)):
        parts.append(' '.join(sentences[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(items): parts.append(items[i - 1])
    return ' '.join(p for p in parts if p)

# %% [markdown]
# ## The four synthetic families
#
# Each family is a function of a random generator and a haystack size `n` (sentences, words, list entries or
# documents), returning the prompt, its answer prefix and the reference answers. The sizing below calls it with a
# fixed generator to find the largest `n` that fits, then once per sample.

# %%
#| export
def _niah(rng, a, n, t: Template, essays):
    nk = max(a['keys'], a['queries'])
    keys = []
    while len(keys) < nk:
        k = _random(a['key'], rng)
        if k not in keys: keys.append(k)
    values = [[_random(a['value'], rng) for _ in range(a['values'])] for _ in keys]
    needles = [NEEDLE.format(type_needle_v=a['value'], key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    if a['haystack'] == 'essay':
        context = _insert_at_depths(split_sentences(_essay_text(essays, n)), needles, rng)
    else:
        if a['haystack'] == 'noise': sentences = [NOISE] * n
        else:                                   # distractor needles: other keys (never a real one), other values
            sentences = []
            while len(sentences) < n:
                k = _random(a['key'], rng)
                if k not in keys:
                    sentences.append(NEEDLE.format(type_needle_v=a['value'], key=k, value=_random(a['value'], rng)))
        for i, nd in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles): sentences.insert(i, nd)
        context = '\n'.join(sentences)
    asked = rng.sample(range(nk), a['queries'])
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = ', '.join(queries[:-1]) + ', and ' + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, kind = t.template, t.answer_prefix, a['value']
    if a['queries'] * a['values'] == 1:
        template, prefix, kind = _singular(template), _singular(prefix), kind[:-1]
    fill = dict(type_needle_v=kind, context=context, query=query)
    return template.format(**fill), prefix.format(**fill), answers

def _chain_names(rng, count: int, letters: int) -> list[str]:
    names = []
    while len(names) < count:
        v = ''.join(rng.choices(string.ascii_uppercase, k=letters))
        if v not in names: names.append(v)
    return names

def _vt_context(rng, a, n, essays, letters=5):
    "Noise (or essay) with the chains' assignments `VAR B = VAR A` spread through it, in chain order."
    hops, chains = a['hops'], a['chains']
    names = _chain_names(rng, (hops + 1) * chains, letters)
    value = str(rng.randint(10000, 99998))
    links = []
    for c in range(chains):
        v = names[c * (hops + 1):(c + 1) * (hops + 1)]
        links.append([f'VAR {v[0]} = {value}'] + [f'VAR {v[j + 1]} = VAR {v[j]} ' for j in range(hops)])
    if a['haystack'] == 'essay':                 # chains interleaved, each keeping its order
        heap = [(rng.random(), c, 0) for c in range(chains)]; heapq.heapify(heap); flat = []
        while heap:
            _, c, j = heapq.heappop(heap); flat.append(links[c][j].strip() + '.')
            if j + 1 < len(links[c]): heapq.heappush(heap, (rng.random(), c, j + 1))
        context = _insert_at_depths(split_sentences(_essay_text(essays, n)), flat, rng)
    else:
        sentences = [NOISE] * n
        for chain in links:
            for j, pos in enumerate(sorted(rng.sample(range(max(len(sentences), len(chain))), len(chain)))):
                sentences.insert(pos + j, chain[j])
        context = '\n'.join(sentences)
    return context.replace('. \n', '.\n'), value, names[:hops + 1]

def _vt(rng, a, n, t: Template, essays, example: str = ''):
    context, value, answers = _vt_context(rng, a, n, essays)
    fill = dict(context=context, query=value, num_v=a['hops'] + 1)
    return example + t.template.format(**fill), t.answer_prefix.format(**fill), answers

def _vt_example(rng, a, n, t: Template, essays) -> str:
    "RULER's worked example before the question: a short chain (3-letter names) with its answer filled in."
    context, value, answers = _vt_context(rng, dict(a, hops=min(10, a['hops'])), n, essays, letters=3)
    fill = dict(context=context, query=value, num_v=a['hops'] + 1)
    return t.template.format(**fill) + t.answer_prefix.format(**fill) + ' ' + ' '.join(answers) + '\n'

@cache
def _cwe_pool(seed: int) -> tuple[tuple, tuple]:
    """RULER's word list (nouns, adjectives and verbs, in a seeded order), and that list followed by adjective-noun
    words, drawn from when a list needs more distinct words than the first holds."""
    w = _words()
    base = sorted(set(w['noun'] + w['adjective'] + w['verb'])); random.Random(seed).shuffle(base)
    extra = sorted({f'{x}-{y}' for x in w['adjective'][:60] for y in w['noun'][:2000]} - set(base))
    random.Random(seed + 1).shuffle(extra)
    return tuple(base), tuple(base + extra)

def _cwe_list(rng, num_words, common, uncommon, num_cw, seed):
    base, full = _cwe_pool(seed)
    pool = base if num_words <= len(base) else full
    if num_words > len(pool): raise ValueError(f"cwe needs {num_words} distinct words; the word pool has {len(pool)}")
    chosen = rng.sample(pool, num_words)
    top, rest = chosen[:num_cw], chosen[num_cw:]
    entries = top * common + rest * uncommon
    rng.shuffle(entries)
    return ' '.join(f'{i + 1}. {w}' for i, w in enumerate(entries)), top

def _cwe(rng, a, n, t: Template, length: int, seed: int):
    short = length < 4096                     # RULER's shorter lists below 4K tokens
    shot_ctx, shot_top = _cwe_list(rng, 20 if short else 40, 3 if short else 10, 1 if short else 3, a['num_cw'], seed)
    ctx, top = _cwe_list(rng, n, 6 if short else a['freq_cw'], 1 if short else a['freq_ucw'], a['num_cw'], seed)
    fill = dict(num_cw=a['num_cw'], query='')
    shot = (t.template.format(context=shot_ctx, **fill) + t.answer_prefix.format(**fill) + ' '
            + ' '.join(f'{i + 1}. {w}' for i, w in enumerate(shot_top)))
    return shot + '\n' + t.template.format(context=ctx, **fill), t.answer_prefix.format(**fill), list(top)

def _zeta(s: float, terms: int = 1000) -> float:
    "Riemann zeta by direct sum plus the Euler-Maclaurin tail (1e-12 accurate for s > 1)."
    k = np.arange(1, terms, dtype=np.float64)
    N = float(terms)
    return float(np.sum(k ** -s) + N ** (1 - s) / (s - 1) + 0.5 * N ** -s + s * N ** (-s - 1) / 12)

def _fwe(rng, a, n, t: Template, vocab_size: int, letters: int = 6):
    "Coded words counted n * k^-alpha / zeta(alpha): the most frequent is '...' (noise), the next three the answer."
    vocab = set()
    while len(vocab) < vocab_size: vocab.add(''.join(rng.choices(string.ascii_lowercase, k=letters)))
    vocab = sorted(vocab); rng.shuffle(vocab); vocab[0] = '...'
    counts = (n * np.arange(1, vocab_size + 1, dtype=np.float64) ** -a['alpha'] / _zeta(a['alpha'])).astype(int)
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    rng.shuffle(words)
    fill = dict(context=' '.join(words), query='')
    return t.template.format(**fill), t.answer_prefix.format(**fill), vocab[1:4]

# %% [markdown]
# ## Question answering over user-supplied files
#
# The QA tasks hide a question's golden paragraphs among other documents. SQuAD (v2 dev, the format of
# `dev-v2.0.json`) gives one golden paragraph; the article's other paragraphs are the first distractors. HotpotQA
# (the distractor dev set) gives two golden paragraphs per question among its own. Unanswerable SQuAD questions are
# left out, as in RULER.

# %%
#| export
@dataclass(frozen=True)
class QASet:
    "Questions (`query`, `outputs`, indices of golden `context` and same-article `more` documents) and documents."
    questions: tuple
    documents: tuple

def read_squad(path) -> QASet:
    data = json.loads(Path(path).read_text())['data']
    docs = sorted({p['context'] for d in data for p in d['paragraphs']}); index = {c: i for i, c in enumerate(docs)}
    qs = []
    for d in data:
        article = [index[p['context']] for p in d['paragraphs']]
        for p in d['paragraphs']:
            for q in p['qas']:
                if q.get('is_impossible'): continue
                qs.append(
                    dict(
                        query=q['question'],
                        outputs=[x['text'] for x in q['answers']],
                        context=[index[p['context']]],
                        more=[i for i in article if i != index[p['context']]],
                    )
                )
    if not qs: raise ValueError(f"{path}: no answerable SQuAD questions")
    return QASet(tuple(qs), tuple(docs))

def read_hotpotqa(path) -> QASet:
    data = json.loads(Path(path).read_text())
    doc = lambda title, sents: f"{title}\n{''.join(sents)}"
    docs = sorted({doc(t, s) for d in data for t, s in d['context']}); index = {c: i for i, c in enumerate(docs)}
    qs = [dict(query=d['question'], outputs=[d['answer']], context=[index[doc(t, s)] for t, s in d['context']], more=[])
          for d in data]
    if not qs: raise ValueError(f"{path}: no HotpotQA questions")
    return QASet(tuple(qs), tuple(docs))

def _qa(rng, qa: QASet, which: int, n, t: Template):
    q = qa.questions[which % len(qa.questions)]
    gold, more = list(q['context']), list(q['more'])
    if n < len(qa.documents):
        if n - len(gold) > len(more):
            others = [i for i in range(len(qa.documents)) if i not in set(gold + more)]
            chosen = gold + more + rng.sample(others, max(0, n - len(gold) - len(more)))
        else: chosen = gold + rng.sample(more, max(0, n - len(gold)))
        docs = [qa.documents[i] for i in chosen]
    else: docs = list((qa.documents * (-(-n // len(qa.documents))))[:n])
    rng.shuffle(docs)
    fill = dict(context='\n\n'.join(f'Document {i + 1}:\n{d}' for i, d in enumerate(docs)), query=q['query'])
    return t.template.format(**fill), t.answer_prefix.format(**fill), list(q['outputs'])

# %% [markdown]
# ## Samples at an exact token budget
#
# A sample's `tokens` is what RULER calls its length: the prompt with its answer prefix, in the model's tokens, plus
# the generation budget. The haystack size comes from a search with one fixed generator per task and length (grow
# by doubling until too long, then bisect); each sample then searches again from there with its own draw, since
# its keys, values or coded words may take more or fewer tokens (RULER shrinks a sample that comes out too long;
# this also fills one that comes out short).

# %%
#| export
@dataclass(frozen=True)
class PublishedSample:
    "One RULER example: the prompt (`input`), the `answer_prefix` the model continues, the reference `outputs`."
    task: str
    length: int
    index: int
    input: str
    answer_prefix: str
    outputs: tuple
    tokens: int
    max_new_tokens: int
    metric: str

    def to_json(self) -> dict:
        "RULER's JSONL record (plus `task`, `max_length` and `metric`)."
        d = asdict(self)
        d['outputs'] = list(self.outputs)
        d['max_length'] = d.pop('length')
        d['length'] = d.pop('tokens')
        return d

def _seed(*parts) -> int: return zlib.crc32(json.dumps(parts).encode())

def count_tokens(tok, text: str, bos: bool = False) -> int:
    return len(tok.encode(text)) + int(bos)

def generate_samples(tok, task: str, length: int, n: int = 10, *, seed: int = 42, templates=None, essays=None,
                     qa=None, bos: bool = False) -> list[PublishedSample]:
    """`n` examples of RULER task `task` whose prompt, answer prefix and generation budget fit `length` tokens of
    `tok`. `essays`: words from `load_essays` (needed by the essay-haystack tasks); `qa`: a `QASet` from
    `read_squad` / `read_hotpotqa` for `qa_1` / `qa_2`; `templates`: from `load_templates` (default ours)."""
    if task not in TASKS: raise ValueError(f"unknown RULER task {task!r}; RULER's are {list(TASKS)}")
    family, a = TASKS[task]
    t = (templates or TEMPLATES)[family]
    if a.get('haystack') == 'essay' and not essays:
        raise ValueError(
            f"{task} hides its needles in essays: pass essays=load_essays(PATH) (RULER uses Paul Graham's)"
        )
    if family == 'qa' and qa is None:
        raise ValueError(f"{task} asks {a['dataset']} questions: pass qa=read_{a['dataset']}(PATH) (the dev set file)")
    budget = length - t.tokens_to_generate
    if budget < 32:
        raise ValueError(
            f"length {length} leaves no room for a {task} prompt beside {t.tokens_to_generate} generated tokens"
        )
    example = ''
    if family == 'variable_tracking':                     # the worked example, sized once per task and length
        ex_budget = min(500, length // 4)
        try:
            m = _fit(lambda k, r: _vt_example(r, a, k, t, essays), tok, ex_budget, _seed('vt-example', length, seed),
                     bos)
        except ValueError: m = 0                          # a short length: the chain alone, without noise around it
        example = _vt_example(random.Random(_seed('vt-example', length, seed, 1)), a, m, t, essays)
    vocab = max(10, budget // 50)
    make = {
        'niah': lambda k, r, i: _niah(r, a, k, t, essays),
        'variable_tracking': lambda k, r, i: _vt(r, a, k, t, essays, example),
        'common_words_extraction': lambda k, r, i: _cwe(r, a, k, t, length, seed),
        'freq_words_extraction': lambda k, r, i: _fwe(r, a, k, t, vocab),
        'qa': lambda k, r, i: _qa(r, qa, i, k, t),
    }[family]
    low = {
        'niah': a.get('keys', 1) * a.get('values', 1) + a.get('queries', 1),
        'variable_tracking': a.get('hops', 4) + 2,
        'common_words_extraction': a.get('num_cw', 10) + 1,
        'freq_words_extraction': 10,
        'qa': 1 + (1 if a.get('dataset') == 'hotpotqa' else 0),
    }[family]
    size = _fit(lambda k, r: ''.join(make(k, r, 0)[:2]), tok, budget, _seed(task, length, seed), bos, low=low)
    out = []
    for i in range(n):                          # each sample's own draw: the largest haystack near `size` that fits
        k = _fit(lambda k, r: ''.join(make(k, r, i)[:2]), tok, budget, _seed(task, length, seed, i), bos, low=low,
                 start=size)
        prompt, prefix, answers = make(k, random.Random(_seed(task, length, seed, i)), i)
        used = count_tokens(tok, prompt + prefix, bos)
        out.append(PublishedSample(task, length, i, prompt, prefix, tuple(answers), used + t.tokens_to_generate,
                                   t.tokens_to_generate, METRIC[family]))
    return out

def _fit(text_of, tok, budget: int, seed: int, bos: bool, low: int = 1, start: int | None = None) -> int:
    """The largest haystack size `k >= low` whose text `text_of(k, rng)` (drawn with a generator seeded by `seed`) fits
    `budget` tokens: steps that double away from `start` (default `low`) until they cross the edge, then bisection."""
    fits = lambda k: count_tokens(tok, text_of(k, random.Random(seed)), bos) <= budget
    if not fits(low):
        raise ValueError(
            f"the prompt does not fit {budget} tokens even with the smallest haystack ({low}); use a longer "
            "length (RULER starts at 4K tokens) or a tokenizer that needs fewer tokens for it"
        )
    start = low if start is None else max(low, start)
    step = max(1, start // 100)
    if fits(start):                                # lo fits, hi does not
        lo, hi = start, start + step
        while fits(hi): lo, step = hi, step * 2; hi = lo + step
    else:
        lo, hi = max(low, start - step), start
        while not fits(lo): hi, step = lo, step * 2; lo = max(low, hi - step)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo

# %% [markdown]
# ## Scoring
#
# A prediction is cleaned as RULER cleans it (stripped, control characters turned into line breaks), then compared
# with the references case-insensitively. Task scores are percentages rounded to two decimals, as in RULER's tables.

# %%
#| export
def postprocess(prediction: str) -> str:
    return re.sub(r'[\x00-\x1f]', '\n', prediction.strip()).strip()

def sample_score(prediction: str, references, metric: str = 'all') -> float:
    "1 when every reference (`all`: the fraction found) or any reference (`part`) occurs in the prediction."
    p = postprocess(prediction).lower()
    hits = [float(r.lower() in p) for r in references]
    if metric == 'all': return sum(hits) / len(hits)
    if metric == 'part': return max(hits)
    raise ValueError(f"unknown metric {metric!r}: 'all' or 'part'")

def string_match_all(preds, refs) -> float:
    "RULER's string_match_all: mean over samples of the fraction of references found, in percent."
    return round(100 * sum(sample_score(p, r, 'all') for p, r in zip(preds, refs, strict=True)) / len(preds), 2)

def string_match_part(preds, refs) -> float:
    "RULER's string_match_part: mean over samples of whether any reference is found, in percent."
    return round(100 * sum(sample_score(p, r, 'part') for p, r in zip(preds, refs, strict=True)) / len(preds), 2)

# %% [markdown]
# ## Examples
#
# A sentencepiece tokenizer trained on the sample corpus (notebook 07) measures the lengths, and the corpus's
# clean prose documents (Python's own module documentation) stand in for Paul Graham's essays (bring the real ones
# for numbers that compare with RULER's tables).
# One sample of each family, its start and its end:

# %%
from fastcore.test import test_eq, test_fail, test_close
from xgen_small.data.sample import load_sample
from xgen_small.tokenizer import Tokenizer, train_tokenizer
docs = load_sample()
tok = Tokenizer(train_tokenizer([d['text'] for d in docs[:600]], 4096))
essays = load_essays([d['text'] for d in docs if d['domain'] == 'prose' and d['meta']['label'] == 'clean' and d['meta']['dup_group'] is None])
print(f'{len(essays):,} words of stand-in essays')
def show(s, head=260, tail=160):
    print(f'--- {s.task} at {s.length:,} tokens: {s.tokens:,} used, answers {list(s.outputs)}')
    print(s.input[:head].replace('\n', '\\n '), '[...]', s.input[-tail:].replace('\n', '\\n '))
    print('answer prefix:', repr(s.answer_prefix))
for task in ('niah_single_2', 'niah_multikey_2', 'vt', 'fwe'):
    show(generate_samples(tok, task, 2048, 1, essays=essays)[0])

# %% [markdown]
# Every task at 2,048 and 8,192 tokens (RULER's tables start at 4K). This small tokenizer spends about eight tokens
# on a numbered entry such as `123. skyscraper`, so the common-words list at 4K (a worked example of 190 entries,
# then ten words thirty times over) does not fit below 8K here; a released model's tokenizer needs about half
# that. Each sample fills its budget to within a few percent.

# %%
import time
suite = {}
t0 = time.perf_counter()
for L in (2048, 8192):
    for task in SYNTHETIC: suite[task, L] = generate_samples(tok, task, L, 4, essays=essays)
print(f'{len(suite) * 4} samples in {time.perf_counter() - t0:.1f}s')
print('| task | ' + ' | '.join(f'{L:,}: tokens used (min-max)' for L in (2048, 8192)) + ' |\n|---|---|---|')
for task in SYNTHETIC:
    cells = [f"{min(x.tokens for x in suite[task, L]):,}-{max(x.tokens for x in suite[task, L]):,}" for L in (2048, 8192)]
    print(f'| {task} | ' + ' | '.join(cells) + ' |')

# %% [markdown]
# The specification, checked on these samples: budgets, key and value types, needle counts, the distractor needles,
# the variable chain, the word counts, the Zipf answer.

# %%
W = _words()
adj, noun = set(W['adjective']), set(W['noun'])
is_word_key = lambda k: any(k[:i] in adj and k[i + 1:] in noun for i, c in enumerate(k) if c == '-')   # 'old-fashioned-pharmacist'
is_uuid4 = lambda v: uuid.UUID(v).version == 4 and str(uuid.UUID(v)) == v
needle_re = re.compile(r'One of the special magic (numbers|uuids) for (.+?) is: (\S+)\.')   # some nouns have spaces
for (task, L), samples in suite.items():
    family, a = TASKS[task]
    for x in samples:
        assert x.length - 0.1 * x.length <= x.tokens <= x.length, (task, L, x.tokens)    # fills, never overflows
        test_eq(x.max_new_tokens, TEMPLATES[family].tokens_to_generate)
        test_eq(x.tokens, count_tokens(tok, x.input + x.answer_prefix) + x.max_new_tokens)
        if family != 'niah': continue
        found = needle_re.findall(x.input)
        test_eq(len(x.outputs), a['values'] * a['queries'])
        assert all(o in x.input for o in x.outputs)
        for kind, key, value in found:
            test_eq(kind, a['value'])
            assert (is_word_key(key) if a['key'] == 'words' else is_uuid4(key)), key
            assert (len(value) == 7 and value.isdigit()) if a['value'] == 'numbers' else is_uuid4(value), value
        if a['haystack'] == 'needle':                          # every line a needle; the asked key appears once
            test_eq(len(found), len(x.input.split('\n')) - 2)
            asked = [k for _, k, v in found if v in x.outputs]
            test_eq(len(asked), 1); test_eq(sum(k == asked[0] for _, k, _ in found), 1)
            assert len(found) > 10
        else:
            test_eq(len(found), max(a['keys'], a['queries']) * a['values'])
        single = a['values'] * a['queries'] == 1
        test_eq(x.answer_prefix.endswith(' is' if single else ' are'), True)
        test_eq(x.input.startswith('A special magic' if single else 'Some special magic'), True)

# %%
x = suite['vt', 8192][0]
example, question = x.input.split('\nFollow the chain', 1)                 # the worked example comes first
assert example.startswith('Follow the chain') and example.count('VAR ') == 5 + 4, example
names = list(x.outputs); value = re.search(r'hold the value (\d{5})', x.answer_prefix).group(1)
test_eq(len(names), 5); assert all(len(n) == 5 and n.isupper() for n in names)
chain = [f'VAR {names[0]} = {value}'] + [f'VAR {names[j + 1]} = VAR {names[j]}' for j in range(4)]
at = [question.index(c) for c in chain]
test_eq(at, sorted(at))                                                     # the chain reads in order
test_eq(question.count('VAR '), 5 + 4)                                      # five lines, four of them name a variable

x = suite['cwe', 8192][0]
main_list = x.input.split('\n')[-2]
counts = {}
for w in re.findall(r'\d+\. (.+?)(?= \d+\. |$)', main_list): counts[w] = counts.get(w, 0) + 1
test_eq(sorted(counts[w] for w in x.outputs), [30] * 10)                     # 10 common words x 30
test_eq(set(c for w, c in counts.items() if w not in x.outputs), {3})       # the rest x 3
x = suite['cwe', 2048][0]
counts = {}
for w in re.findall(r'\d+\. (.+?)(?= \d+\. |$)', x.input.split('\n')[-2]): counts[w] = counts.get(w, 0) + 1
test_eq(sorted(counts[w] for w in x.outputs), [6] * 10)                      # below 4K tokens: x 6 and x 1

x = suite['fwe', 8192][0]
from collections import Counter
coded = Counter(w for w in x.input.split('\n')[0].split() if re.fullmatch(r'[a-z]{6}|\.\.\.', w))
test_eq(coded.most_common(1)[0][0], '...')                                  # the top word is the noise '...'
test_eq([w for w, _ in coded.most_common(4)[1:]], list(x.outputs))          # then the three answers, in order
c = [n for _, n in coded.most_common(4)]
assert c[0] > c[1] > c[2] > c[3], c                                         # Zipf: strictly decreasing
test_close(_zeta(2.0), np.pi ** 2 / 6, eps=1e-10); test_close(_zeta(3.0), 1.2020569031595942, eps=1e-10)

# %% [markdown]
# Samples are a pure function of the tokenizer, task, length, index and seed:

# %%
a1, a2 = generate_samples(tok, 'niah_multikey_1', 2048, 3, essays=essays), generate_samples(tok, 'niah_multikey_1', 2048, 3, essays=essays)
test_eq(a1, a2)
test_eq(len({x.input for x in a1}), 3)
assert generate_samples(tok, 'niah_multikey_1', 2048, 1, essays=essays, seed=7)[0] != a1[0]
test_eq(a1[0].to_json()['max_length'], 2048); test_eq(a1[0].to_json()['length'], a1[0].tokens)

# %% [markdown]
# **Scoring.** A prediction counts a reference when it contains it (case does not matter); `all` averages over
# the references, `part` takes the best. Two samples, one with all four values found and one with one of four:

# %%
refs = [['1234567', '2345678', '3456789', '4567890'], ['1234567', '2345678', '3456789', '4567890']]
preds = ['1234567, 2345678, 3456789 and 4567890.', ' 1234567 and then I forget']
print(string_match_all(preds, refs), string_match_part(preds, refs))
test_eq(string_match_all(preds, refs), 62.5); test_eq(string_match_part(preds, refs), 100.0)
test_eq(sample_score('The answer: PARIS\x07', ['Paris'], 'part'), 1.0)
test_eq(sample_score('', ['a', 'b'], 'all'), 0.0)
test_fail(lambda: sample_score('x', ['x'], 'some'), contains="'all' or 'part'")

# %% [markdown]
# ## QA from user files
#
# Two small files in the SQuAD v2 and HotpotQA formats (a user brings the real dev sets):

# %%
import tempfile
qdir = Path(tempfile.mkdtemp())
squad = dict(data=[dict(title=f'Article {i}', paragraphs=[
    dict(context=f'Paragraph {j} of article {i}. ' + docs[10 * i + j]['text'][:400], qas=[
        dict(question=f'What is said in paragraph {j} of article {i}?', is_impossible=False,
             answers=[dict(text=f'answer {i}.{j}'), dict(text=f'reply {i}.{j}')]),
        dict(question='What cannot be answered?', is_impossible=True, answers=[])]) for j in range(3)]) for i in range(8)])
(qdir / 'squad.json').write_text(json.dumps(squad))
hotpot = [dict(question=f'Which {i}?', answer=f'yes {i}', context=[[f'Title {i}.{k}', [docs[100 + 4 * i + k]['text'][:300]]] for k in range(4)])
          for i in range(6)]
(qdir / 'hotpotqa.json').write_text(json.dumps(hotpot))
sq, hp = read_squad(qdir / 'squad.json'), read_hotpotqa(qdir / 'hotpotqa.json')
print(len(sq.questions), 'SQuAD questions over', len(sq.documents), 'documents;', len(hp.questions), 'HotpotQA over', len(hp.documents))
test_eq(len(sq.questions), 24)                                   # the unanswerable ones are left out
q = generate_samples(tok, 'qa_1', 2048, 3, qa=sq)
print(q[1].input[-200:], '|', q[1].answer_prefix, '| references', q[1].outputs)
for i, x in enumerate(q):
    gold = sq.documents[sq.questions[i]['context'][0]]
    assert gold in x.input and sq.questions[i]['query'] in x.input
    test_eq(x.outputs, tuple(sq.questions[i]['outputs'])); test_eq(x.metric, 'part')
    assert x.tokens <= 2048
h = generate_samples(tok, 'qa_2', 2048, 2, qa=hp)[1]
assert all(hp.documents[j] in h.input for j in hp.questions[1]['context'])
test_eq(sample_score('It is reply 0.1, I think', q[1].outputs, 'part'), 1.0)

# %% [markdown]
# ## RULER's own wording
#
# `load_templates` reads RULER's `constants.py` without running it, or a JSON file of the same shape. A file laid
# out like RULER's (the wording here is a stand-in; point it at RULER's file for the real one):

# %%
ruler_like = qdir / 'constants.py'
ruler_like.write_text('"""Task templates."""\n\nTASKS = {\n'
                      "    'niah': {'tokens_to_generate': 128,\n"
                      "             'template': 'Some magic {type_needle_v} are below.\\n{context}\\nWhat are all the magic {type_needle_v} for {query}?',\n"
                      "             'answer_prefix': ' The magic {type_needle_v} for {query} are'},\n"
                      "    'qa': {'tokens_to_generate': 32, 'template': 'Docs:\\n{context}\\nQuestion: {query}', 'answer_prefix': ' Answer:'},\n}\n")
theirs = load_templates(ruler_like)
y = generate_samples(tok, 'niah_single_1', 2048, 1, templates=theirs)[0]
print(y.input[:80].replace('\n', ' '), '...', y.input[-60:].replace('\n', ' '), '|', y.answer_prefix)
assert y.input.startswith('A magic number is below.') and y.answer_prefix.endswith(' is'), y.answer_prefix   # made singular
test_eq(theirs['variable_tracking'], TEMPLATES['variable_tracking'])        # families the file leaves out keep ours
(qdir / 't.json').write_text(json.dumps({'qa': {'template': '{context} Q: {query}', 'answer_prefix': ' A:'}}))
test_eq(load_templates(qdir / 't.json')['qa'], Template('{context} Q: {query}', ' A:', 32))
for bad, msg in ((qdir / 'nope.py', 'no template file'),):
    test_fail(lambda: load_templates(bad), contains=msg)
(qdir / 'b1.py').write_text('import os\nTASKS = dict(os.environ)\n');           test_fail(lambda: load_templates(qdir / 'b1.py'), contains='not a plain literal')
(qdir / 'b2.py').write_text('TEMPLATES = {}\n');                                 test_fail(lambda: load_templates(qdir / 'b2.py'), contains='no `TASKS = {...}`')
(qdir / 'b3.json').write_text(json.dumps({'qa': {'template': '{context} {question}'}}));   test_fail(lambda: load_templates(qdir / 'b3.json'), contains="uses ['question']")
(qdir / 'b4.json').write_text(json.dumps({'qa': {'template': 'Q: {query}'}}));    test_fail(lambda: load_templates(qdir / 'b4.json'), contains="has no ['context']")
(qdir / 'b5.json').write_text(json.dumps({'niha': {'template': '{context}'}}));   test_fail(lambda: load_templates(qdir / 'b5.json'), contains="unknown task family 'niha'")

# %% [markdown]
# Bad requests are named:

# %%
test_fail(lambda: generate_samples(tok, 'niah_single_2', 2048, 1), contains='pass essays=load_essays(PATH)')
test_fail(lambda: generate_samples(tok, 'qa_2', 2048, 1), contains='pass qa=read_hotpotqa(PATH)')
test_fail(lambda: generate_samples(tok, 'niah', 2048, 1), contains="unknown RULER task 'niah'")
test_fail(lambda: generate_samples(tok, 'niah_single_1', 100, 1), contains='leaves no room')
test_fail(lambda: generate_samples(tok, 'cwe', 512, 1), contains='does not fit')
test_fail(lambda: load_essays(['too short']), contains='needs real text')
test_eq(split_sentences('Dr. Who came. "Yes!" she said. 3 cats ran. e.g. this'), ['Dr.', 'Who came.', '"Yes!" she said.', '3 cats ran. e.g. this'])

# %% [markdown]
# ## Evaluating a model
#
# `evaluate_published` generates each task's samples, lets the model continue every prompt (the prompt and its
# answer prefix, encoded as the harness encodes them: no BOS unless asked) greedily through the KV-cache generator
# of notebook 15 (long prompts prefilled blockwise, so memory stays linear in the length), and scores the
# continuations. With no `tasks` it runs every task its inputs allow: the noise, needle and word tasks always, the
# essay tasks when `essays` are given, `qa_1` / `qa_2` when `qa` holds the SQuAD / HotpotQA sets.
#
# The same samples can be run by lm-evaluation-harness with any of its backends: `write_harness_tasks` writes them
# as harness tasks (one JSONL and one YAML per task and length, scored by this module's `sample_score`), for
# `lm_eval --include_path DIR --tasks ...`. Notebook 30 runs both on one checkpoint and compares them sample by
# sample.

# %%
#| export
def available_tasks(essays=None, qa: dict | None = None) -> tuple:
    "The tasks these inputs allow: every synthetic task without essays but the essay ones, and the QA sets given."
    qa = qa or {}
    return tuple(
        t
        for t, (family, a) in TASKS.items()
        if (family != 'qa' and (essays or a.get('haystack') != 'essay')) or (family == 'qa' and a['dataset'] in qa)
    )

def evaluate_published(model, tok, tasks=None, lengths=(4096,), *, n: int = 10, seed: int = 42, templates=None,
                       essays=None, qa: dict | None = None, batch: int = 8, bos: bool = False,
                       keep_outputs: bool = False) -> list[dict]:
    """RULER scores (percent) of `model` on `n` samples of every task at every length; `qa` maps 'squad' and
    'hotpotqa' to sets from `read_squad` / `read_hotpotqa`."""
    from xgen_small.generate import generate
    tasks = available_tasks(essays, qa) if tasks is None else tuple(tasks)
    too_long = [L for L in lengths if L > model.cfg.max_seq_len]
    if too_long: raise ValueError(f"lengths {too_long} exceed the model's max_seq_len {model.cfg.max_seq_len}")
    eot = tok.eos_id if tok.eos_id is not None else tok.turn_end_ids[0]
    rows = []
    for task in tasks:
        a = TASKS.get(task, (None, {}))[1]          # an unknown task is named by generate_samples
        for L in lengths:
            samples = generate_samples(tok, task, L, n, seed=seed, templates=templates, essays=essays,
                                       qa=(qa or {}).get(a.get('dataset')), bos=bos)
            preds = []
            for i in range(0, n, batch):
                chunk = samples[i:i + batch]
                prompts = [([tok.bos_id] if bos else []) + tok.encode(s.input + s.answer_prefix) for s in chunk]
                gen = generate(model, prompts, chunk[0].max_new_tokens, stop_tokens=[eot], pad_id=tok.pad_id or 0)
                preds += [tok.decode(ids) for ids in gen.tokens]
            scores = [sample_score(p, s.outputs, s.metric) for p, s in zip(preds, samples)]
            row = dict(task=task, length=L, n=n, metric=samples[0].metric, score=round(100 * float(np.mean(scores)), 2))
            if keep_outputs:
                row['outputs'] = [
                    dict(outputs=list(s.outputs), prediction=p, score=sc) for s, p, sc in zip(samples, preds, scores)
                ]
            rows.append(row)
    return rows

def score_table(rows: list[dict]) -> str:
    "A Markdown table of RULER scores (percent), tasks down and lengths across, with the mean over tasks last."
    tasks = list(dict.fromkeys(r['task'] for r in rows)); lengths = sorted({r['length'] for r in rows})
    cell = {(r['task'], r['length']): r['score'] for r in rows}
    fmt = lambda v: '' if v is None else f'{v:.1f}'
    out = ['| task | ' + ' | '.join(f'{L:,}' for L in lengths) + ' |', '|---|' + '---|' * len(lengths)]
    out += [f'| {t} | ' + ' | '.join(fmt(cell.get((t, L))) for L in lengths) + ' |' for t in tasks]
    means = [np.mean([cell[t, L] for t in tasks if (t, L) in cell]) for L in lengths]
    return '\n'.join(out + ['| **mean** | ' + ' | '.join(f'{m:.1f}' for m in means) + ' |'])

def write_harness_tasks(samples, directory, prefix: str = 'ruler') -> list[str]:
    """Write `samples` (from `generate_samples`) as lm-evaluation-harness tasks `{prefix}_{task}_{length}` in
    `directory`; returns their names. Each is a `generate_until` task over a local JSONL file: the prompt is the
    sample's input followed by its answer prefix (the harness' `gen_prefix`), greedy, the task's generation budget,
    no stop string, scored per sample by `sample_score` (metric `score`, in percent)."""
    d = Path(directory); d.mkdir(parents=True, exist_ok=True)
    (d / f'{prefix}_scoring.py').write_text(
        'from xgen_small.ruler_published import sample_score\n\n'
        'def process_results(doc, results):\n'
        '    return {"score": 100 * sample_score(results[0], doc["outputs"], doc["metric"])}\n')
    groups: dict = {}
    for s in samples: groups.setdefault((s.task, s.length), []).append(s)
    names = []
    for (task, L), group in groups.items():
        name = f'{prefix}_{task}_{L}'
        data = d / f'{name}.jsonl'
        data.write_text(''.join(json.dumps(s.to_json()) + '\n' for s in group))
        (d / f'{name}.yaml').write_text(
            f'task: {name}\ndataset_path: json\n'
            f'dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n'
            'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{input}}"\ndoc_to_target: "{{outputs}}"\n'
            f'gen_prefix: answer_prefix\nprocess_results: !function {prefix}_scoring.process_results\n'
            f'generation_kwargs:\n  do_sample: false\n  until: []\n  max_gen_toks: {group[0].max_new_tokens}\n'
            'metric_list:\n  - metric: score\n    aggregation: mean\n    higher_is_better: true\n'
            'metadata:\n  version: 1.0\n'
        )
        names.append(name)
    return names

# %% [markdown]
# A tiny random model (it cannot answer; notebook 30 evaluates a trained one, through this evaluator and the
# harness) shows the shape of the results, and the harness files for the same samples:

# %%
from flax import nnx
from xgen_small.config import get_preset
from xgen_small.model import Decoder
rand = Decoder(get_preset('tiny', vocab_size=tok.vocab_size, max_seq_len=2048), rngs=nnx.Rngs(0))
t0 = time.perf_counter()
res = evaluate_published(rand, tok, ('niah_single_1', 'vt'), (2048,), n=2, keep_outputs=True)
print(f'{time.perf_counter() - t0:.0f}s')
print(score_table(res))
for r in res: print(r['task'], repr(r['outputs'][0]['prediction'][:50]))
hdir = qdir / 'harness'
names = write_harness_tasks([x for t in ('niah_single_1', 'vt') for x in generate_samples(tok, t, 2048, 2)], hdir)
print(names, sorted(f.name for f in hdir.iterdir()))
print((hdir / 'ruler_vt_2048.yaml').read_text())

# %%
test_eq([(r['task'], r['length'], r['n'], r['metric']) for r in res], [('niah_single_1', 2048, 2, 'all'), ('vt', 2048, 2, 'all')])
assert all(0 <= r['score'] <= 100 and len(r['outputs']) == 2 for r in res)
test_eq(names, ['ruler_niah_single_1_2048', 'ruler_vt_2048'])
assert '| **mean** | 75.0 |' in score_table([dict(task='a', length=4096, score=100.0), dict(task='b', length=4096, score=50.0)])
recs = [json.loads(l) for l in (hdir / 'ruler_vt_2048.jsonl').read_text().splitlines()]
test_eq([r['input'] + r['answer_prefix'] for r in recs], [x.input + x.answer_prefix for x in generate_samples(tok, 'vt', 2048, 2)])
import importlib.util
spec = importlib.util.spec_from_file_location('scoring', hdir / 'ruler_scoring.py'); scoring = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scoring)
test_eq(scoring.process_results(recs[0], [' ' + ' '.join(recs[0]['outputs'])]), {'score': 100.0})
test_fail(lambda: evaluate_published(rand, tok, ('vt',), (4096,)), contains="exceed the model's max_seq_len")
test_eq(available_tasks(), ('niah_single_1', 'niah_multikey_2', 'niah_multikey_3', 'vt', 'cwe', 'fwe'))
test_eq(available_tasks(essays, {'squad': sq}), SYNTHETIC + ('qa_1',))

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
