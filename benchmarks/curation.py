"""Curation throughput and memory: our `curate` with local processes and with Ray, and datatrove's local executor
running the equivalent rules plus its MinHash deduplication, on the same corpora, same machine, same run.

    python benchmarks/curation.py                     # the sample corpus x1 and x8
    python benchmarks/curation.py --sizes 1,8,32,160  # up to 160 copies (about 1 GB)
    python benchmarks/curation.py --quick             # a quarter of the sample, smoke run (tests)

A corpus of size N is the sample corpus N times, every copy after the first with a quarter of its words replaced by
other words of the corpus (so copies are near duplicates, not exact ones), written as 4 x N JSONL shards. Every
system runs in a fresh process with `--workers` worker processes, and we report documents/s, MB/s per core (input
bytes over wall time over workers), and peak resident memory: of the largest worker process, and of the driver
(the process that runs our clustering stage, stage 3, or datatrove's).

Systems:

- `ours-local` / `ours-ray`: `curate` with its default rules, the quality ensemble and exact + MinHash dedup;
  the per-shard stage on a process pool or as Ray tasks on a local Ray instance of `--workers` CPUs;
- `ours-rules+dedup`: the same without the quality ensemble (what datatrove's pipeline below also does);
- `datatrove`: `JsonlReader` -> Gopher repetition -> Gopher quality -> C4 (terminal punctuation not required, as
  ours) -> FineWeb quality -> `JsonlWriter`, then its four MinHash stages (signatures, buckets, clusters, filter),
  each on `LocalPipelineExecutor` with as many tasks as shards (buckets: one per band) and `--workers` workers.
  datatrove has no per-domain chains, so these web rules also judge (and mostly drop) the code and math documents
  that our code and math chains keep: the work per document is comparable, the kept counts are not.

Worker RSS of datatrove's forked workers is `ru_maxrss` of the children, which on Linux includes what a worker
inherited from its parent at fork.
"""
import argparse
import gzip
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dedup import _quiet  # noqa: E402  (the sibling script: silences datatrove's logs at the fd level)

SYSTEMS = ('ours-local', 'ours-ray', 'ours-rules+dedup', 'datatrove')


def _rss_mb(who) -> float:
    "Peak RSS in MB of this process (its own: VmHWM on Linux) or of its largest waited-for child (`ru_maxrss`)."
    if who == resource.RUSAGE_SELF:
        from xgen_small.data.curate import _peak_rss_mb
        return _peak_rss_mb()
    r = resource.getrusage(who).ru_maxrss
    return r / (2**20 if sys.platform == 'darwin' else 2**10)


def make_corpus(n_copies: int, out: Path, quick: bool = False) -> tuple[list[Path], int, int]:
    "Write the corpus of `n_copies` as 4 x n_copies JSONL shards; returns the shards, documents and bytes."
    from xgen_small.data.sample import load_sample
    docs = load_sample()[: 500 if quick else None]
    vocab = [w for d in docs for w in d['text'].split()]
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = 4 * n_copies
    files = [open(out / f'shard-{i:04d}.jsonl', 'w', encoding='utf-8') for i in range(n_shards)]
    n = size = 0
    for c in range(n_copies):
        for j, d in enumerate(docs):
            text = d['text']
            if c:
                words = text.split(' ')
                for k in rng.sample(range(len(words)), len(words) // 4): words[k] = rng.choice(vocab)
                text = ' '.join(words)
            line = json.dumps(dict(id=f"{d['id']}~{c}", domain=d['domain'], text=text), ensure_ascii=False) + '\n'
            files[(c * len(docs) + j) % n_shards].write(line)
            n += 1; size += len(line.encode())
    for f in files: f.close()
    return sorted(out.glob('shard-*.jsonl')), n, size


def run_ours(shards, work: Path, workers: int, executor: str, quality: Path | None) -> dict:
    from xgen_small.data.curate import CurateConfig, RayExecutor, curate
    ex = RayExecutor(num_cpus=workers) if executor == 'ray' else None
    t0 = time.perf_counter()
    s = curate(shards, work / 'out', CurateConfig(workers=workers), quality_model=quality, progress=False,
               executor=ex).summary
    return dict(seconds=time.perf_counter() - t0, kept=s['kept'], worker_rss_mb=s['peak_rss_mb']['worker'],
                driver_rss_mb=_rss_mb(resource.RUSAGE_SELF))


def run_datatrove(shards, work: Path, workers: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    src = str(shards[0].parent)
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    tasks = len(shards)
    kw = dict(logging_dir=str(work / 'logs'), skip_completed=False, workers=workers)
    t0 = time.perf_counter()
    with _quiet():
        LocalPipelineExecutor([
            JsonlReader(src, glob_pattern='shard-*.jsonl'), GopherRepetitionFilter(), GopherQualityFilter(),
            C4QualityFilter(filter_no_terminal_punct=False), FineWebQualityFilter(),
            JsonlWriter(str(work / 'filtered'))], tasks=tasks, **kw).run()
        LocalPipelineExecutor(
            [JsonlReader(str(work / 'filtered')), MinhashDedupSignature(str(work / 'sigs'), config=cfg)],
            tasks=tasks, **kw).run()
        LocalPipelineExecutor([MinhashDedupBuckets(str(work / 'sigs'), str(work / 'buckets'), config=cfg)],
                              tasks=cfg.num_buckets, **kw).run()
        LocalPipelineExecutor([MinhashDedupCluster(str(work / 'buckets'), str(work / 'remove'), config=cfg)],
                              tasks=1, **kw).run()
        LocalPipelineExecutor([JsonlReader(str(work / 'filtered')), MinhashDedupFilter(str(work / 'remove')),
                               JsonlWriter(str(work / 'kept'))], tasks=tasks, **kw).run()
    elapsed = time.perf_counter() - t0
    kept = sum(1 for p in (work / 'kept').rglob('*.jsonl.gz') for _ in gzip.open(p, 'rt'))
    return dict(seconds=elapsed, kept=kept, worker_rss_mb=_rss_mb(resource.RUSAGE_CHILDREN),
                driver_rss_mb=_rss_mb(resource.RUSAGE_SELF))


def _one(a) -> None:
    "Child mode: run one system on one corpus and print its measurements as JSON."
    shards = sorted(Path(a.corpus).glob('shard-*.jsonl'))
    work = Path(tempfile.mkdtemp(prefix='curation-bench-'))
    if a.system == 'datatrove': r = run_datatrove(shards, work, a.workers)
    else:
        quality = None if a.system == 'ours-rules+dedup' else Path(a.quality)
        r = run_ours(shards, work, a.workers, 'ray' if a.system == 'ours-ray' else 'local', quality)
    print(json.dumps(r))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sizes', default='1,8', help='comma-separated copies of the sample corpus')
    ap.add_argument('--systems', default=','.join(SYSTEMS), help=f'comma-separated, of: {", ".join(SYSTEMS)}')
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--json', action='store_true', help='also print the rows as one JSON line')
    ap.add_argument('--rows', help='append each row to this JSONL file as soon as it is measured')
    ap.add_argument('--one', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--system', help=argparse.SUPPRESS)
    ap.add_argument('--corpus', help=argparse.SUPPRESS)
    ap.add_argument('--quality', help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one: return _one(a)
    systems = [s.strip() for s in a.systems.split(',') if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown: raise SystemExit(f'unknown system(s) {unknown}; choose from {list(SYSTEMS)}')
    sizes = [1] if a.quick else [int(x) for x in a.sizes.split(',')]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from xgen_small.data.curate import _train_default_quality
        quality = tmp / 'quality_model.npz'
        if {'ours-local', 'ours-ray'} & set(systems): _train_default_quality(quality)   # trained once, not timed
        print(f"curation benchmark, {a.workers} workers; MB/s per core = input MB / wall seconds / {a.workers}")
        print(f"{'corpus':>14} {'system':22} {'seconds':>8} {'docs/s':>8} {'MB/s/core':>10} {'kept':>8} "
              f"{'worker RSS':>11} {'driver RSS':>11}")
        for n in sizes:
            shards, n_docs, n_bytes = make_corpus(n, tmp / f'corpus-{n}', a.quick)
            for system in systems:
                cmd = [sys.executable, __file__, '--one', '--system', system, '--corpus', str(tmp / f'corpus-{n}'),
                       '--quality', str(quality), '--workers', str(a.workers)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0: raise RuntimeError(f'{system} on {n}x failed:\n{p.stderr[-3000:]}')
                r = json.loads(p.stdout.strip().splitlines()[-1])
                row = dict(copies=n, documents=n_docs, mb=round(n_bytes / 1e6, 1), system=system,
                           seconds=round(r['seconds'], 1), docs_per_s=round(n_docs / r['seconds'], 1),
                           mb_per_s_per_core=round(n_bytes / 1e6 / r['seconds'] / a.workers, 3), kept=r['kept'],
                           worker_rss_mb=round(r['worker_rss_mb']), driver_rss_mb=round(r['driver_rss_mb']))
                rows.append(row)
                if a.rows:
                    with open(a.rows, 'a') as f: f.write(json.dumps(row) + '\n')
                label = f"{n}x {row['mb']:,} MB"
                print(f"{label:>14} {system:22} {row['seconds']:>8,.1f} "
                      f"{row['docs_per_s']:>8,.0f} {row['mb_per_s_per_core']:>10.3f} {row['kept']:>8,} "
                      f"{row['worker_rss_mb']:>8,} MB {row['driver_rss_mb']:>8,} MB", flush=True)
    if a.json: print(json.dumps(rows))
    return rows


if __name__ == '__main__':
    main()
