"""Near-duplicate detection: our MinHash/LSH (datasketch) vs datatrove's MinHash pipeline, same corpus, same run.

    python benchmarks/dedup.py           # the shipped sample corpus (about 2,100 documents)
    python benchmarks/dedup.py --quick   # 400 documents (smoke run, used by tests)

Both use word 5-gram shingles and 14 bands x 8 rows (datatrove's defaults, 112 hashes). We report
end-to-end throughput (documents/s: shingling, signatures, LSH, clustering; datatrove's four-stage
file-based pipeline run in-process with one task) and pair-level F1 of the resulting clusters against
(a) the planted duplicate groups and (b) clusters of documents whose exact 5-gram Jaccard is >= 0.7
(the 14x8 S-curve's midpoint).

datatrove's default text normalisation replaces every number by one placeholder; the sample's math
documents are generated from templates that differ only in their numbers, so with that default they
all collapse into one cluster. We also run it with numbers kept, which matches our normalisation
(lower-case words, punctuation dropped, numbers kept): that is the like-for-like comparison.
"""
import argparse
import contextlib
import json
import struct
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def _quiet():
    "Silence stdout/stderr at the file-descriptor level (also for loguru handlers bound to the original streams)."
    import os
    import sys
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1); os.dup2(null, 2)
    try: yield
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        for fd in (*saved, null): os.close(fd)


def _datatrove_clusters(docs, work: Path, bands: int, rows: int, norm_numbers: bool):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.utils.text import TextNormConfig
    work = work / f'numbers-{norm_numbers}'
    src = work / 'input'; src.mkdir(parents=True)
    with open(src / 'docs.jsonl', 'w') as f:
        for d in docs: f.write(json.dumps({'id': d['id'], 'text': d['text']}) + '\n')
    cfg = MinhashConfig(
        n_grams=5, num_buckets=bands, hashes_per_bucket=rows, norm_config=TextNormConfig(norm_numbers=norm_numbers)
    )
    kw = dict(logging_dir=str(work / 'logs'), skip_completed=False, workers=1)
    t0 = time.perf_counter()
    with _quiet():   # datatrove logs every task and stage
        LocalPipelineExecutor(
            [JsonlReader(str(src)), MinhashDedupSignature(str(work / 'sigs'), config=cfg)], tasks=1, **kw
        ).run()
        LocalPipelineExecutor(
            [MinhashDedupBuckets(str(work / 'sigs'), str(work / 'buckets'), config=cfg)], tasks=bands, **kw
        ).run()
        LocalPipelineExecutor(
            [MinhashDedupCluster(str(work / 'buckets'), str(work / 'clusters'), config=cfg, save_cluster_id=True)],
            tasks=1,
            **kw,
        ).run()
    elapsed = time.perf_counter() - t0
    clusters = {}
    path = work / 'clusters' / '000000.clusters'
    if path.exists():
        raw = path.read_bytes()
        for i in range(0, len(raw), 8):
            idx, cid = struct.unpack('<II', raw[i:i + 8])
            clusters.setdefault(cid, []).append(docs[idx]['id'])
    return list(clusters.values()), elapsed


def _ours(docs, bands, rows, verify, threshold=0.7):
    from xgen_small.data.dedup import FuzzyDedup
    t0 = time.perf_counter()
    fd = FuzzyDedup(threshold=threshold, num_perm=bands * rows, params=(bands, rows), verify=verify)
    for d in docs: fd.add(d['id'], d['text'])
    clusters = fd.clusters()
    return [m for m in clusters.values() if len(m) > 1], time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--json', action='store_true', help='also print the rows as one JSON line')
    a = ap.parse_args(argv)
    from xgen_small.data.dedup import cluster_pairs, components, jaccard_truth, pair_scores, shingle_hashes
    from xgen_small.data.sample import load_sample

    docs = load_sample()[: 400 if a.quick else None]
    bands, rows = 14, 8
    groups = {}
    for d in docs:
        if d['meta']['dup_group'] is not None: groups.setdefault(d['meta']['dup_group'], []).append(d['id'])
    planted = cluster_pairs(groups.values())
    truth = cluster_pairs(components(jaccard_truth({d['id']: shingle_hashes(d['text']) for d in docs}, 0.7)))

    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        systems = {
            'datatrove, its defaults': lambda: _datatrove_clusters(docs, Path(tmp), bands, rows, norm_numbers=True),
            'datatrove, numbers kept': lambda: _datatrove_clusters(docs, Path(tmp), bands, rows, norm_numbers=False),
            'ours, LSH only (14x8)': lambda: _ours(docs, bands, rows, 'none'),
            'ours, verified >= 0.7 (14x8)': lambda: _ours(docs, bands, rows, 'signature'),
        }
        print(f'dedup benchmark: {len(docs):,} documents, word 5-grams, {bands} bands x {rows} rows; '
              f'{len(planted)} planted duplicate pairs, {len(truth)} pairs with Jaccard >= 0.7 (transitive)')
        print(f"{'system':30} {'docs/s':>8} | {'F1 planted':>10} {'F1 Jaccard':>10} | {'P/R Jaccard':>12}")
        for name, run in systems.items():
            clusters, elapsed = run()
            pred = cluster_pairs(clusters)
            sp, sj = pair_scores(pred, planted), pair_scores(pred, truth)
            r = dict(system=name, docs_per_s=len(docs) / elapsed, f1_planted=sp['f1'], f1_jaccard=sj['f1'],
                     precision=sj['precision'], recall=sj['recall'])
            rows_out.append(r)
            print(
                f"{name:30} {r['docs_per_s']:>8,.0f} | {sp['f1']:>10.3f} {sj['f1']:>10.3f} | "
                f"{sj['precision']:>5.3f}/{sj['recall']:<6.3f}"
            )
    if a.json: print(json.dumps(rows_out))
    return rows_out


if __name__ == '__main__':
    main()
