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
# # Deduplication
#
# > Exact hashing, then MinHash/LSH near-duplicates with datasketch, union-find clusters and their frequencies.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/04_data_dedup.ipynb)

# %%
#| default_exp data.dedup

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

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

# %%
from fastcore.test import test_eq, test_close, test_fail
import time
from collections import Counter
from xgen_small.data.sample import load_sample


# %% [markdown]
# The report removes duplicates with "exact hashing and fuzzy fingerprinting". Duplicates hurt twice:
# they waste compute on text the model has already seen, and they skew the mixture toward whatever
# happens to be copied most (boilerplate, licences, popular forks). But the copy count is also
# *information*: a document copied across the web is often a document people value. xGen-small's
# curation is "frequency-aware", which we read as: remove the copies, and remember how many there were
# (the cluster size), so the mixture (notebook 05) can up-sample popular documents on purpose,
# under a cap, instead of by accident.

# %% [markdown]
# ## Exact duplicates
#
# Hash the text after optional normalisation: Unicode NFC (so that "é" typed two ways is one string),
# whitespace collapsed, letter case folded. A 128-bit BLAKE2b digest makes accidental collisions
# impossible in practice, and the deduplicator keeps only digests: memory is 16 bytes per distinct
# document plus the set's overhead, whatever the document length, and documents stream through once.

# %%
#| export
def normalize(text: str, *, nfc: bool = True, whitespace: bool = True, lowercase: bool = False) -> str:
    "Text normalised for duplicate detection."
    if nfc: text = unicodedata.normalize('NFC', text)
    if whitespace: text = ' '.join(text.split())
    if lowercase: text = text.lower()
    return text

def exact_key(text: str, **norm) -> bytes:
    "A 16-byte digest of the normalised text (`norm`: options of `normalize`)."
    return hashlib.blake2b(normalize(text, **norm).encode('utf-8'), digest_size=16).digest()

@dataclass
class ExactDedup:
    "Streaming exact deduplication: the first occurrence of each normalised text is kept, later ones dropped."
    nfc: bool = True
    whitespace: bool = True
    lowercase: bool = False
    first: dict = field(default_factory=dict)     # digest -> id of the first occurrence
    count: dict = field(default_factory=dict)     # digest -> number of occurrences

    def __call__(self, doc_id: str, text: str) -> str | None:
        "None if `text` is new (keep), else the id of the document it duplicates."
        k = exact_key(text, nfc=self.nfc, whitespace=self.whitespace, lowercase=self.lowercase)
        self.count[k] = self.count.get(k, 0) + 1
        if k in self.first: return self.first[k]
        self.first[k] = doc_id
        return None

    def frequency(self, text: str) -> int:
        return self.count.get(exact_key(text, nfc=self.nfc, whitespace=self.whitespace, lowercase=self.lowercase), 0)


# %%
ex = ExactDedup(lowercase=True)
[ex('a', 'Caf\u00e9  au lait'), ex('b', 'cafe\u0301 au\nlait'), ex('c', 'CAFÉ AU LAIT'), ex('d', 'tea')]

# %%
test_eq([ex('e', 'Café au lait'), ex('f', 'coffee')], ['a', None])
test_eq(ex.frequency('café au lait'), 4)
test_eq(ExactDedup()('x', 'A b'), None)

# %% [markdown]
# ## Near duplicates: shingles and MinHash
#
# Two documents are near-duplicates when their sets of word 5-grams ("shingles") overlap a lot:
# Jaccard similarity $J(A, B) = |A \cap B| / |A \cup B|$. Comparing every pair is quadratic, so we
# sketch each set with **MinHash** (Broder, 1997): apply $k$ random permutations to the shingle
# hashes and keep each permutation's minimum. The probability that two sets share a minimum is
# exactly $J$, so the fraction of equal entries in two signatures estimates $J$.
#
# Shingle hashes are computed with vectorised NumPy: each distinct word is hashed once (CRC-32,
# cached), and a 5-gram's 64-bit hash is a polynomial in its words' hashes, so no Python code runs
# per shingle. The permutations and minima are `datasketch`'s own (`MinHash.update_batch`, the
# 64-bit affine scheme), fed our hash values.

# %%
#| export
_WORD = re.compile(r'\w+')
_MULT = np.uint64(0x9E3779B97F4A7C15)          # odd 64-bit multiplier (golden ratio)
_word_cache: dict[str, int] = {}

def _word_hashes(words: list[str]) -> np.ndarray:
    if len(_word_cache) > 2_000_000: _word_cache.clear()
    get = _word_cache.get
    out = np.empty(len(words), np.uint64)
    for i, w in enumerate(words):
        h = get(w)
        if h is None: h = _word_cache[w] = zlib.crc32(w.encode()) | (zlib.crc32(w.encode(), 0x5BD1E995) << 32)
        out[i] = h
    return out

def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    "Distinct 64-bit hashes of the word `n`-grams of the normalised, lower-cased text."
    words = _WORD.findall(normalize(text, lowercase=True))
    if not words: return np.zeros(0, np.uint64)
    h = _word_hashes(words)
    if len(words) < n: n = len(words)
    m = len(words) - n + 1
    acc = np.zeros(m, np.uint64)
    with np.errstate(over='ignore'):
        for j in range(n): acc = acc * _MULT + h[j:j + m]
    return np.unique(acc)

def minhash(shingles: np.ndarray, num_perm: int = 128, seed: int = 1) -> LeanMinHash:
    "A datasketch MinHash signature of a set of 64-bit shingle hashes."
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=int, scheme='affine64')
    if len(shingles): m.update_batch(shingles)
    return LeanMinHash(m)


# %%
docs = load_sample()
a = ' '.join(next(d for d in docs if d['domain'] == 'prose')['text'].split()[:150])   # 150 words of real prose
words = a.split(); words[70] = 'EDITED'; b = ' '.join(words)                          # one word changed
sa, sb = shingle_hashes(a), shingle_hashes(b)
true_j = len(np.intersect1d(sa, sb)) / len(np.union1d(sa, sb))
est_j = minhash(sa, 256).jaccard(minhash(sb, 256))
true_j, est_j

# %%
test_close(est_j, true_j, eps=0.1)
test_eq(minhash(sa).jaccard(minhash(shingle_hashes(a.upper()))), 1.0)   # case and spacing do not matter
test_eq(len(shingle_hashes('too short')), 1)


# %% [markdown]
# ## LSH: bands and rows from a threshold
#
# Locality-sensitive hashing splits the $k = b \cdot r$ signature entries into $b$ bands of $r$ rows;
# two documents become a *candidate pair* if all rows of any band agree. For Jaccard $s$ that happens
# with probability $P(s) = 1 - (1 - s^r)^b$, an S-curve. We choose $(b, r)$ so that the curve steps
# at our threshold: minimise the weighted area of false positives ($\int_0^t P$) and false negatives
# ($\int_t^1 1 - P$) over all $b \cdot r \le k$ (the criterion datasketch uses; written here so the
# notebook can show it). Because every candidate is verified afterwards, a false positive costs only
# one comparison while a false negative is a duplicate lost, so `FuzzyDedup` weights false negatives
# four times as heavily as false positives.

# %%
#| export
def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    "The (bands, rows) minimising weighted false-positive and false-negative areas of the LSH S-curve."
    if not 0 < threshold < 1: raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    best, best_cost = None, np.inf
    lo, hi = np.linspace(0, threshold, 200), np.linspace(threshold, 1, 200)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo ** r) ** b, lo)
            fn = np.trapezoid((1 - hi ** r) ** b, hi)
            cost = fp_weight * fp + fn_weight * fn
            if cost < best_cost: best, best_cost = (b, r), cost
    return best


# %%
import matplotlib.pyplot as plt
s = np.linspace(0, 1, 200)
fig, ax = plt.subplots(figsize=(6, 3.2))
for t in (0.5, 0.7, 0.85):
    bands, rows = lsh_params(t, 128, fp_weight=0.2, fn_weight=0.8)
    ax.plot(s, 1 - (1 - s ** rows) ** bands, label=f'threshold {t}: b={bands}, r={rows}')
    ax.axvline(t, ls=':', c='grey')
ax.set_xlabel('Jaccard similarity'); ax.set_ylabel('P(candidate pair)'); ax.legend(); ax.set_title('LSH S-curves, 128 permutations')
plt.tight_layout(); plt.show()

# %%
bands, rows = lsh_params(0.7, 128)
test_eq(bands * rows <= 128, True)
p_cand = lambda s: 1 - (1 - s ** rows) ** bands
test_eq(p_cand(0.9) > 0.99 and p_cand(0.3) < 0.05, True)
test_fail(lambda: lsh_params(1.5, 128), contains='threshold')


# %% [markdown]
# ## Clusters
#
# LSH proposes candidates; each is **verified** before it counts, either by the signatures' estimated
# Jaccard (constant memory per document) or by the exact Jaccard of the stored shingle sets (exact,
# but memory grows with the corpus). Verified pairs are merged by union-find, so that if A≈B and B≈C
# then A, B and C form one cluster even if A and C are further apart. Each cluster keeps one
# representative: the document with the highest quality score if scores are given, else the first
# seen; the others are dropped and the cluster size is recorded as the representative's frequency.

# %%
#| export
class UnionFind:
    "Disjoint sets over hashable items, with path halving and union by size."
    def __init__(self): self.parent, self.size = {}, {}
    def find(self, x):
        self.parent.setdefault(x, x); self.size.setdefault(x, 1)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]; x = self.parent[x]
        return x
    def union(self, a, b):
        a, b = self.find(a), self.find(b)
        if a == b: return
        if self.size[a] < self.size[b]: a, b = b, a
        self.parent[b] = a; self.size[a] += self.size[b]

@dataclass
class FuzzyDedup:
    "MinHash + LSH near-duplicate clustering. `add` documents, then `clusters()`."
    threshold: float = 0.6
    num_perm: int = 128
    ngram: int = 5
    verify: str = 'signature'           # 'signature' (estimated Jaccard), 'exact' (stored shingle sets) or 'none'
    seed: int = 1
    params: tuple[int, int] | None = None   # (bands, rows); chosen from the threshold when None

    def __post_init__(self):
        if self.verify not in ('signature', 'exact', 'none'):
            raise ValueError(f"verify must be 'signature', 'exact' or 'none', got {self.verify!r}")
        self.params = self.params or lsh_params(self.threshold, self.num_perm, fp_weight=0.2, fn_weight=0.8)
        self.lsh = MinHashLSH(num_perm=self.num_perm, params=self.params)
        self.sigs, self.shingles, self.order, self.uf = {}, {}, [], UnionFind()
        self.n_candidates = 0

    def signature(self, text: str) -> tuple[np.ndarray, LeanMinHash]:
        sh = shingle_hashes(text, self.ngram)
        return sh, minhash(sh, self.num_perm, self.seed)

    def add(self, doc_id, text: str | None = None, *, signature=None) -> list:
        "Index a document (from its text, or a precomputed `(shingles, minhash)`); returns the ids it was merged with."
        if doc_id in self.sigs: raise KeyError(f"document id {doc_id!r} was added twice")
        sh, sig = signature if signature is not None else self.signature(text)
        merged = []
        for other in self.lsh.query(sig):
            self.n_candidates += 1
            if self.verify == 'signature': ok = sig.jaccard(self.sigs[other]) >= self.threshold
            elif self.verify == 'exact':
                o = self.shingles[other]
                ok = len(np.intersect1d(sh, o, assume_unique=True)) / max(len(np.union1d(sh, o)), 1) >= self.threshold
            else: ok = True
            if ok: self.uf.union(doc_id, other); merged.append(other)
        self.lsh.insert(doc_id, sig)
        self.sigs[doc_id] = sig; self.order.append(doc_id); self.uf.find(doc_id)
        if self.verify == 'exact': self.shingles[doc_id] = sh
        return merged

    def clusters(self, scores: dict | None = None) -> dict:
        "representative id -> list of member ids (representative first), for every document added."
        groups: dict = {}
        for d in self.order: groups.setdefault(self.uf.find(d), []).append(d)
        pos = {d: i for i, d in enumerate(self.order)}
        out = {}
        for members in groups.values():
            rep = max(members, key=lambda d: (scores.get(d, 0.0), -pos[d])) if scores else members[0]
            out[rep] = [rep] + [m for m in members if m != rep]
        return out


# %%
fd = FuzzyDedup(threshold=0.6)
texts = {'orig': a, 'edit': b, 'copy': a, 'other': ' '.join(next(d for d in docs if d['domain'] == 'web')['text'].split()[:150])}
for k, t in texts.items(): fd.add(k, t)
fd.clusters(), fd.clusters(scores={'edit': 0.9})

# %%
test_eq(fd.clusters(), {'orig': ['orig', 'edit', 'copy'], 'other': ['other']})
test_eq(list(fd.clusters(scores={'edit': 0.9})), ['edit', 'other'])
test_fail(lambda: fd.add('orig', a), contains='added twice')
test_fail(lambda: FuzzyDedup(verify='maybe'), contains='verify')


# %% [markdown]
# ## Evaluation on the sample corpus
#
# Two kinds of ground truth, because they answer different questions:
#
# - **planted**: the sample's duplicate groups (exact, normalised and near copies of known originals).
#   Did we find the copies we made?
# - **exact Jaccard**: every pair of documents whose shingle sets really have Jaccard ≥ the threshold,
#   found by brute force (an inverted index over shingles, then exact Jaccard for every pair that
#   shares one), closed under transitivity as our clusters are. Did MinHash+LSH find what an
#   exhaustive search finds? This also counts natural near-duplicates we did not plant (templated
#   spam, for instance).
#
# Scores are over pairs: a pair is two documents in the same cluster.

# %%
#| export
def cluster_pairs(clusters) -> set:
    "All unordered pairs of documents that share a cluster (`clusters`: iterable of member lists)."
    return {tuple(sorted(p)) for members in clusters for p in combinations(members, 2)}

def pair_scores(predicted: set, truth: set) -> dict:
    "Precision, recall and F1 of predicted pairs against true pairs."
    tp = len(predicted & truth)
    p = tp / len(predicted) if predicted else 1.0
    r = tp / len(truth) if truth else 1.0
    return dict(
        precision=p, recall=r, f1=2 * p * r / (p + r) if p + r else 0.0, predicted=len(predicted), true=len(truth)
    )

def components(pairs) -> list[list]:
    "Connected components (lists of ids) of the graph whose edges are `pairs`."
    uf = UnionFind()
    for x, y in pairs: uf.union(x, y)
    groups: dict = {}
    for x in uf.parent: groups.setdefault(uf.find(x), []).append(x)
    return list(groups.values())

def jaccard_truth(shingles: dict, threshold: float) -> set:
    "Every pair of ids whose exact shingle-set Jaccard is at least `threshold` (inverted-index brute force)."
    index: dict = {}
    for d, sh in shingles.items():
        for h in sh.tolist(): index.setdefault(h, []).append(d)
    cand = set()
    for ds in index.values():
        if 1 < len(ds) < 500: cand.update(combinations(ds, 2))
    out = set()
    for x, y in cand:
        a, b = shingles[x], shingles[y]
        if len(np.intersect1d(a, b, assume_unique=True)) / len(np.union1d(a, b)) >= threshold:
            out.add(tuple(sorted((x, y))))
    return out


# %%
groups: dict = {}
for d in docs:
    if d['meta']['dup_group'] is not None: groups.setdefault(d['meta']['dup_group'], []).append(d['id'])
planted = cluster_pairs(groups.values())
truth = cluster_pairs(components(jaccard_truth({d['id']: shingle_hashes(d['text']) for d in docs}, 0.6)))
results = {}
for verify in ('signature', 'exact'):
    t0 = time.perf_counter()
    fd = FuzzyDedup(threshold=0.6, verify=verify)
    for d in docs: fd.add(d['id'], d['text'])
    elapsed = time.perf_counter() - t0
    predicted = cluster_pairs(fd.clusters().values())
    results[verify] = {name: pair_scores(predicted, t) for name, t in (('planted', planted), ('jaccard', truth))}
    print(f"verify={verify}: {len(docs):,} documents in {elapsed:.2f}s ({len(docs) / elapsed:,.0f} docs/s), "
          f"bands x rows = {fd.params}, {fd.n_candidates:,} candidate pairs")
    for name, s in results[verify].items():
        print(f"   vs {name:8} precision {s['precision']:.3f}  recall {s['recall']:.3f}  F1 {s['f1']:.3f}  "
              f"({s['predicted']} predicted, {s['true']} true pairs)")
clusters = fd.clusters()

# %%
test_eq(results['exact']['jaccard']['f1'] >= 0.98, True)
test_eq(results['signature']['jaccard']['f1'] >= 0.95, True)
test_eq(results['signature']['planted']['recall'] >= 0.95, True)

# %% [markdown]
# The largest clusters, with the representative each keeps and its recorded frequency (the cluster
# size; the curation pipeline adds the exact copies removed before this step):

# %%
by_id = {d['id']: d for d in docs}
for rep_id, members in sorted(clusters.items(), key=lambda kv: -len(kv[1]))[:5]:
    print(f"frequency {len(members):2}  keep {rep_id:11} ({by_id[rep_id]['meta']['label']}, {by_id[rep_id]['meta']['source'][:40]})")

# %% [markdown]
# Which planted copies are missed, and what else is found? Near copies are by construction the
# hardest; extra pairs beyond the planted ones are natural duplicates in the corpus (pages generated
# from the same template), which the exact-Jaccard truth confirms:

# %%
kind = {d['id']: d['meta']['dup_kind'] for d in docs}
label = {d['id']: d['meta']['label'] for d in docs}
predicted = cluster_pairs(clusters.values())
missed = Counter(max(kind[x], kind[y], key=lambda k: k != 'original') for x, y in planted - predicted)
extra = Counter(tuple(sorted({label[x], label[y]})) for x, y in predicted - planted)
print('missed planted pairs by copy kind:', dict(missed))
print('found pairs not planted, by labels:', dict(extra.most_common(6)))
print('of those, confirmed by exact Jaccard:', len((predicted - planted) & truth), 'of', len(predicted - planted))

# %% [markdown]
# Exact deduplication on the same corpus, with and without case folding. A group is *resolved* when
# exactly one of its members survives (the first one seen, which need not be the original). Without
# case folding the upper-cased copies survive; with it, every exact and normalised group is resolved:

# %%
group_kind = {d['meta']['dup_group']: d['meta']['dup_kind'] for d in docs if d['meta']['dup_kind'] in ('exact', 'normalized')}
def resolved(lowercase):
    ex = ExactDedup(lowercase=lowercase)
    dropped = {d['id'] for d in docs if ex(d['id'], d['text']) is not None}
    left = Counter(d['meta']['dup_group'] for d in docs if d['meta']['dup_group'] in group_kind and d['id'] not in dropped)
    return len(dropped), Counter(group_kind[g] for g, n in left.items() if n == 1), Counter(group_kind.values())
for lower in (False, True):
    n, ok, total = resolved(lower)
    print(f'lowercase={lower!s:5}: {n} dropped; resolved groups: ' + ', '.join(f'{k} {ok[k]}/{total[k]}' for k in total))

# %%
n, ok, total = resolved(True)
test_eq(ok, total)

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
