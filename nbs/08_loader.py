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
# # Data loader
#
# > A memory-mapped token store, packing with segment ids, and a mixture sampler that is sharded and resumable.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/08_loader.ipynb)

# %%
#| default_exp data.loader

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

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from xgen_small.config import Config
from xgen_small.tokenizer import Tokenizer

# %%
from fastcore.test import test_eq, test_close, test_fail
import tempfile, time
from collections import Counter
from xgen_small.data.curate import CurateConfig, curate
from xgen_small.data.sample import sample_shards
from xgen_small.tokenizer import train_tokenizer


# %% [markdown]
# ## The token store
#
# Tokenising is done once, not every epoch. The store is a flat array of token ids on disk
# (`tokens.bin`, uint16 when the vocabulary fits, else uint32), opened with `np.memmap` so that a
# process touches only the pages it reads, plus an index: where each document starts, its length,
# domain, quality, duplicate frequency and planned epochs per mixture phase (notebooks 05 and 06).
# Every document ends with `</s>`, so the model learns where documents end.
#
# The curation run planned epochs with *estimated* token counts (it runs before a tokenizer exists).
# Real counts differ by domain (digits are split one per token, so math costs more tokens per byte
# than prose), so the builder rescales each domain's epochs to deliver the planned shares exactly.
#
# The store records its tokenizer's fingerprint and vocabulary size. Reading tokens with another
# tokenizer would produce a silently wrong model, so the loader refuses.

# %%
#| export
@dataclass
class TokenStore:
    "Memory-mapped tokens of many documents plus their index; open with `TokenStore.open(dir)`."
    path: Path
    tokens: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    domains: np.ndarray          # int index into meta['domains']
    quality: np.ndarray
    frequency: np.ndarray
    epochs: np.ndarray           # [docs, phases]
    meta: dict

    @classmethod
    def open(cls, path) -> TokenStore:
        path = Path(path)
        if not (path / 'meta.json').exists(): raise FileNotFoundError(f"no token store at {path} (meta.json missing)")
        meta = json.loads((path / 'meta.json').read_text())
        idx = np.load(path / 'index.npz')
        tokens = (
            np.memmap(path / 'tokens.bin', dtype=meta['dtype'], mode='r')
            if meta['n_tokens']
            else np.zeros(0, meta['dtype'])
        )
        return cls(
            path,
            tokens,
            idx['offsets'],
            idx['lengths'],
            idx['domains'],
            idx['quality'],
            idx['frequency'],
            idx['epochs'],
            meta,
        )

    def __len__(self): return len(self.offsets)
    def doc(self, i: int) -> np.ndarray: return self.tokens[self.offsets[i]:self.offsets[i] + self.lengths[i]]
    @property
    def phases(self) -> list[str]: return self.meta['phases']

    def check(self, tokenizer: Tokenizer | None = None, vocab_size: int | None = None):
        "Raise if this store was not written by `tokenizer`, or holds ids a model with `vocab_size` cannot embed."
        if tokenizer is not None and tokenizer.fingerprint != self.meta['fingerprint']:
            raise ValueError(
                f"token store {self.path} was written by tokenizer {self.meta['fingerprint']} "
                f"but tokenizer {tokenizer.fingerprint} was given: retokenise or use the matching tokenizer"
            )
        if vocab_size is not None and self.meta['vocab_size'] > vocab_size:
            raise ValueError(
                f"token store {self.path} uses a vocabulary of {self.meta['vocab_size']} but the model embeds only "
                f"{vocab_size} ids"
            )

def newline_ids(tok: Tokenizer) -> list[int]:
    "Ids of the pieces that contain a line break (recorded in the store for boundary-aware splitting)."
    return [i for i in range(tok.vocab_size) if '\n' in tok.sp.id_to_piece(i) or tok.sp.id_to_piece(i) == '<0x0A>']

def rebalance_epochs(
    epochs: np.ndarray, lengths: np.ndarray, domains: np.ndarray, shares: list[dict], names: list[str]
) -> np.ndarray:
    "Scale each (phase, domain) column of `epochs` so that real token counts give the planned domain `shares` per "
    "phase."
    out = epochs.astype(np.float64).copy()
    for ph, share in enumerate(shares):
        delivered = {d: float(np.sum(out[domains == i, ph] * lengths[domains == i])) for i, d in enumerate(names)}
        total = sum(delivered.values())
        for i, d in enumerate(names):
            if delivered[d] > 0: out[domains == i, ph] *= share.get(d, 0.0) * total / delivered[d]
    return out.astype(np.float32)

def build_token_store(
    kept_paths: Sequence, tok: Tokenizer, out_dir, *, plan: dict | None = None, batch: int = 256
) -> TokenStore:
    """Tokenise curated documents (`kept/*.jsonl.gz` records of notebook 06) into a token store at `out_dir`.
    `plan`: the curation summary's `mixture` entry; the epochs are then rescaled so that *real* token counts
    (the curation run could only estimate them) deliver the planned domain shares."""
    out_dir = Path(out_dir); out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    domains, phases = [], None
    offsets, lengths, dom, qual, freq, epochs = [], [], [], [], [], []
    n = 0
    with open(out_dir / 'tokens.bin', 'wb') as f:
        def flush(recs):
            nonlocal n
            for r, ids in zip(recs, tok.encode_batch([r['text'] for r in recs], errors='replace')):
                ids = np.asarray(ids + [tok.eos_id], dtype)
                f.write(ids.tobytes())
                offsets.append(n); lengths.append(len(ids)); n += len(ids)
                if r['domain'] not in domains: domains.append(r['domain'])
                dom.append(domains.index(r['domain']))
                qual.append(r.get('quality', 1.0))
                freq.append(r.get('frequency', 1))
                epochs.append([r.get('epochs', {}).get(p, 1.0) for p in phases])
        recs = []
        for p in kept_paths:
            for line in gzip.open(p, 'rt', encoding='utf-8'):
                r = json.loads(line)
                if phases is None: phases = sorted(r.get('epochs', {'all': 1.0}))
                recs.append(r)
                if len(recs) == batch: flush(recs); recs = []
        if recs: flush(recs)
    if not offsets: raise ValueError(f"no documents in {[str(p) for p in kept_paths]}: nothing to store")
    lengths, dom = np.asarray(lengths, np.int32), np.asarray(dom, np.int8)
    epochs = np.asarray(epochs, np.float32).reshape(len(offsets), len(phases))
    if plan is not None:
        missing = set(phases) - set(plan)
        if missing: raise ValueError(f"the mixture plan has no phase(s) {sorted(missing)}")
        epochs = rebalance_epochs(epochs, lengths, dom, [plan[p]['shares'] for p in phases], domains)
    np.savez(out_dir / 'index.npz', offsets=np.asarray(offsets, np.int64), lengths=lengths, domains=dom,
             quality=np.asarray(qual, np.float32), frequency=np.asarray(freq, np.int32), epochs=epochs)
    meta = dict(
        vocab_size=tok.vocab_size,
        fingerprint=tok.fingerprint,
        dtype=np.dtype(dtype).name,
        domains=domains,
        phases=phases,
        n_docs=len(offsets),
        n_tokens=n,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        newline_ids=newline_ids(tok),
    )
    (out_dir / 'meta.json').write_text(json.dumps(meta, indent=1))
    return TokenStore.open(out_dir)


# %%
tmp = Path(tempfile.mkdtemp())
res = curate(sample_shards(), tmp / 'curated', CurateConfig(workers=1), quality_model=None, progress=False)
kept_texts = [json.loads(l)['text'] for p in res.kept_paths for l in gzip.open(p, 'rt')]
tok = Tokenizer(train_tokenizer(kept_texts, vocab_size=4096))
t0 = time.perf_counter()
summary = json.loads((res.out_dir / 'summary.json').read_text())
store = build_token_store(res.kept_paths, tok, tmp / 'store', plan=summary['mixture'])
print(f"{len(store):,} documents, {store.meta['n_tokens']:,} tokens ({store.meta['dtype']}) in {time.perf_counter() - t0:.1f}s; "
      f"phases {store.phases}; domains {store.meta['domains']}")

# %%
test_eq(tok.decode(store.doc(0)), kept_texts[0])
test_eq(int(store.doc(0)[-1]), tok.eos_id)
test_eq(int(store.lengths.sum()), store.meta['n_tokens'])
store.check(tok, vocab_size=4096)
other = Tokenizer(train_tokenizer(kept_texts[:300], vocab_size=2048))
test_fail(lambda: store.check(other), contains='written by tokenizer')
test_fail(lambda: store.check(vocab_size=1024), contains='embeds only 1024')
(tmp / 'empty.jsonl.gz').write_bytes(gzip.compress(b''))
test_fail(lambda: build_token_store([tmp / 'empty.jsonl.gz'], tok, tmp / 'empty'), contains='no documents')


# %% [markdown]
# ## Packing
#
# A training batch is `batch_size` rows of `seq_len` tokens. Packing fills each row with as many
# documents as fit, back to back, and records for every position its **segment id** (1, 2, ... per
# document in the row; 0 for padding) and its **position** within its document's piece. The model
# (notebook 12) uses both: attention never crosses a segment boundary, and RoPE rotates by the
# in-document position, so a packed row computes exactly what separate documents would.
#
# Targets are the next token *of the same segment*; the last token of each segment, and padding,
# carry no loss (`loss_mask` 0). Two ways to handle a document that does not fit the rest of a row:
#
# - `split='fill'` cuts it at the row's end and continues it in the next row: no padding at all.
# - `split='boundary'` starts it on a fresh row instead (padding the rest), and a document longer than
#   a whole row is cut at a line break near the end of the window when there is one, so pieces
#   tend to be whole lines and paragraphs.

# %%
#| export
@dataclass(frozen=True)
class LoaderConfig(Config):
    "Shape, packing mode, mixture phase, seed and this process's share of the data."
    seq_len: int
    batch_size: int                 # rows per process
    phase: str | None = None        # mixture phase whose planned epochs drive sampling (None: every document once)
    split: str = 'fill'             # 'fill' or 'boundary'
    seed: int = 0
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1: raise ValueError("seq_len must be >= 2 and batch_size >= 1")
        if self.split not in ('fill', 'boundary'):
            raise ValueError(f"split must be 'fill' or 'boundary', got {self.split!r}")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} is not in [0, {self.process_count})")

@dataclass
class LoaderState:
    "Where the loader is: pass over the sampled order, document cursor, token offset in it, batches served."
    pass_: int = 0
    cursor: int = 0
    offset: int = 0
    step: int = 0

    def to_pytree(self) -> dict: return {k: np.asarray(v, np.int64) for k, v in self.__dict__.items()}
    @classmethod
    def from_pytree(cls, tree: dict) -> LoaderState: return cls(**{k: int(v) for k, v in tree.items()})


# %% [markdown]
# ## Sampling by the mixture plan
#
# For a phase, each document's planned epochs $e_i$ (notebook 05) become an integer number of
# appearances per pass: $\lfloor e_i \rfloor$, plus one more with probability $e_i - \lfloor e_i \rfloor$.
# The appearances are shuffled; that order is the pass. Both steps draw from a generator seeded by
# `(seed, pass, phase)`, so every process computes the same order without talking to the others,
# and process $p$ of $P$ takes every $P$-th entry: disjoint shares of one global order. When a pass
# ends, the next one is drawn with the next pass number.
#
# The loader's whole state is four integers. Saved with a checkpoint and handed back, it reproduces
# exactly the batches an uninterrupted run would have produced.

# %%
#| export
class Loader:
    "Packed, mixture-sampled, process-sharded, resumable batches from a `TokenStore`."
    def __init__(self, store: TokenStore, cfg: LoaderConfig, state: LoaderState | dict | None = None, *,
                 tokenizer: Tokenizer | None = None, vocab_size: int | None = None):
        store.check(tokenizer, vocab_size)
        if cfg.phase is not None and cfg.phase not in store.phases:
            raise ValueError(f"phase {cfg.phase!r} is not in the store's mixture plan {store.phases}")
        self.store, self.cfg = store, cfg
        self.state = LoaderState.from_pytree(state) if isinstance(state, dict) else (state or LoaderState())
        self.pad, self.eos = store.meta['pad_id'], store.meta['eos_id']
        self._orders: dict = {}
        order = self._order(0)
        if len(order) == 0:
            raise ValueError(
                f"process {cfg.process_index} of {cfg.process_count} gets no documents in phase {cfg.phase!r} "
                f"({len(store)} documents in the store)"
            )
        need = cfg.seq_len * cfg.batch_size
        have = int(store.lengths[order].sum())
        if have < need:
            raise ValueError(
                f"one batch needs {need:,} tokens ({cfg.batch_size} x {cfg.seq_len}) but a pass over this process's "
                f"share holds only {have:,}: lower seq_len or batch_size, or add data"
            )

    def _order(self, pass_: int) -> np.ndarray:
        if pass_ not in self._orders:
            ph = -1 if self.cfg.phase is None else self.store.phases.index(self.cfg.phase)
            rng = np.random.default_rng([self.cfg.seed, pass_, ph + 1])
            e = np.ones(len(self.store)) if self.cfg.phase is None else self.store.epochs[:, ph].astype(np.float64)
            reps = np.floor(e).astype(np.int64) + (rng.random(len(e)) < e - np.floor(e))
            order = rng.permutation(np.repeat(np.arange(len(e)), reps))
            self._orders = {pass_: order[self.cfg.process_index::self.cfg.process_count]}
        return self._orders[pass_]

    def _boundary_cut(self, doc: np.ndarray, start: int, room: int) -> int:
        "How many tokens of `doc[start:]` to put in a row of `room`: up to a newline near the end when possible."
        if len(doc) - start <= room: return len(doc) - start
        window = doc[start:start + room]
        nl = np.flatnonzero(np.isin(window[int(room * 0.75):], self._newline_ids()))
        return int(room * 0.75) + int(nl[-1]) + 1 if len(nl) else room

    def _newline_ids(self) -> np.ndarray:
        if not hasattr(self, '_nl'): self._nl = np.asarray(self.store.meta['newline_ids'], np.int64)
        return self._nl

    def _row(self):
        L, s = self.cfg.seq_len, self.state
        toks = np.full(L, self.pad, np.int64); seg = np.zeros(L, np.int32); pos = np.zeros(L, np.int32)
        dom_tokens = np.zeros(len(self.store.meta['domains']), np.int64)
        filled, segment = 0, 0
        while filled < L:
            order = self._order(s.pass_)
            d = int(order[s.cursor]); doc = self.store.doc(d)
            remaining, room = len(doc) - s.offset, L - filled
            if self.cfg.split == 'boundary' and filled > 0 and remaining > room: break   # start it on a fresh row
            take = self._boundary_cut(doc, s.offset, room) if self.cfg.split == 'boundary' else min(room, remaining)
            segment += 1
            toks[filled:filled + take] = doc[s.offset:s.offset + take]
            seg[filled:filled + take] = segment; pos[filled:filled + take] = np.arange(take)
            dom_tokens[self.store.domains[d]] += take
            filled += take; s.offset += take
            if s.offset == len(doc):
                s.offset, s.cursor = 0, s.cursor + 1
                if s.cursor == len(order): s.cursor, s.pass_ = 0, s.pass_ + 1
        return toks, seg, pos, dom_tokens

    def __next__(self) -> dict:
        rows = [self._row() for _ in range(self.cfg.batch_size)]
        toks = np.stack([r[0] for r in rows])
        seg = np.stack([r[1] for r in rows])
        pos = np.stack([r[2] for r in rows])
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        targets = np.concatenate([np.where(same, toks[:, 1:], self.pad), np.full((len(rows), 1), self.pad)], axis=1)
        mask = np.concatenate([same, np.zeros((len(rows), 1), bool)], axis=1)
        self.state.step += 1
        return dict(inputs=toks.astype(np.int32), targets=targets.astype(np.int32), segment_ids=seg, positions=pos,
                    loss_mask=mask.astype(np.float32), domain_tokens=sum(r[3] for r in rows))

    def __iter__(self) -> Iterator[dict]: return self


# %%
loader = Loader(store, LoaderConfig(seq_len=64, batch_size=2, phase='broad'), tokenizer=tok)
b = next(loader)
print({k: v.shape for k, v in b.items()})
row = next(r for bt in (next(loader) for _ in range(50)) for r in range(2) if bt['segment_ids'][r].max() > 1 and (b := bt))
print('a row where one document ends and the next begins:')
print('segments: ', b['segment_ids'][row].tolist())
print('positions:', b['positions'][row].tolist())
print('loss mask:', b['loss_mask'][row].astype(int).tolist())

# %%
for k in ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask'): test_eq(b[k].shape, (2, 64))
r0 = b['inputs'][0]; s0 = b['segment_ids'][0]
for t in range(63):   # a target is the next token of the same segment, and only then is it trained on
    test_eq(bool(b['loss_mask'][0, t]), bool(s0[t] == s0[t + 1] and s0[t] > 0))
    if b['loss_mask'][0, t]: test_eq(b['targets'][0, t], r0[t + 1])
test_eq(b['loss_mask'][:, -1].sum(), 0)

# %% [markdown]
# `split='boundary'` pads instead of cutting documents that would fit a row, and cuts long ones at
# line breaks:

# %%
bl = Loader(store, LoaderConfig(seq_len=256, batch_size=4, phase='broad', split='boundary'))
bb = next(bl)
fill = Loader(store, LoaderConfig(seq_len=256, batch_size=4, phase='broad'))
bf = next(fill)
print(f"padding: boundary {np.mean(bb['segment_ids'] == 0):.1%}, fill {np.mean(bf['segment_ids'] == 0):.1%}")
ends = [tok.sp.id_to_piece(int(bb['inputs'][r][np.flatnonzero(bb['segment_ids'][r])[-1]])) for r in range(4)]
print('last piece of each row:', ends)

# %%
test_eq(np.mean(bf['segment_ids'] == 0), 0.0)
nl = set(store.meta['newline_ids']) | {tok.eos_id}
for r in range(4):   # in boundary mode every piece ends a document, ends at a line break, or fills a whole row
    for sid in set(bb['segment_ids'][r].tolist()) - {0}:
        idx = np.flatnonzero(bb['segment_ids'][r] == sid)
        test_eq(int(bb['inputs'][r, idx[-1]]) in nl or len(idx) == 256, True)

# %% [markdown]
# ## The mixture, delivered
#
# Over one pass of the `broad` phase, the tokens the loader serves per domain match the plan's shares:

# %%
ld = Loader(store, LoaderConfig(seq_len=512, batch_size=8, phase='broad'))
served = np.zeros(len(store.meta['domains']))
t0 = time.perf_counter(); n_batches = 0
while ld.state.pass_ == 0:
    served += next(ld)['domain_tokens']; n_batches += 1
elapsed = time.perf_counter() - t0
planned = summary['mixture']['broad']['shares']
print(f'{n_batches} batches, {served.sum():,.0f} tokens in {elapsed:.2f}s ({served.sum() / elapsed / 1e6:.1f}M tokens/s)')
for i, d in enumerate(store.meta['domains']): print(f'{d:6} served {served[i] / served.sum():6.1%}   planned {planned[d]:6.1%}')

# %%
for i, d in enumerate(store.meta['domains']): test_close(served[i] / served.sum(), planned[d], eps=0.03)

# %% [markdown]
# ## Sharded and resumable
#
# Two processes take alternate slots of the same shuffled pass, which interleaved give back exactly one process's
# whole pass (a document up-sampled twice may land in both); and a loader
# rebuilt from a saved state continues with exactly the batches an uninterrupted loader serves.

# %%
cfg = LoaderConfig(seq_len=128, batch_size=4, phase='broad', seed=3)
one = Loader(store, cfg)
parts = [Loader(store, LoaderConfig(**{**cfg.__dict__, 'process_index': p, 'process_count': 2})) for p in range(2)]
orders = [p._order(0) for p in parts]
test_eq(sorted(np.concatenate(orders).tolist()), sorted(one._order(0).tolist()))
merged = np.empty(len(one._order(0)), np.int64); merged[0::2], merged[1::2] = orders
test_eq(merged, one._order(0))

uninterrupted = [next(one) for _ in range(12)]
first = Loader(store, cfg); [next(first) for _ in range(5)]
saved = first.state.to_pytree()                        # what a checkpoint stores
resumed = Loader(store, cfg, state=saved)
for a, b_ in zip(uninterrupted[5:], [next(resumed) for _ in range(7)]):
    for k in a: test_eq(np.array_equal(a[k], b_[k]), True)
saved

# %% [markdown]
# ## Bad input

# %%
test_fail(lambda: Loader(store, LoaderConfig(seq_len=2**20, batch_size=64, phase='broad')), contains='one batch needs')
test_fail(lambda: Loader(store, LoaderConfig(seq_len=64, batch_size=1, phase='final')), contains="phase 'final'")
test_fail(lambda: Loader(store, LoaderConfig(seq_len=64, batch_size=1), tokenizer=other), contains='written by tokenizer')
test_fail(lambda: Loader(store, LoaderConfig(seq_len=64, batch_size=1), vocab_size=100), contains='embeds only')
test_fail(lambda: LoaderConfig(seq_len=64, batch_size=1, process_index=2, process_count=2), contains='process_index')
test_fail(lambda: TokenStore.open(tmp / 'nowhere'), contains='no token store')

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
