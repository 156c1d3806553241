"""Long-prompt prefill: one pass against chunks (`generate(..., prefill_chunk=C)`), the tiny model on this CPU.

    python benchmarks/prefill.py            # 4K, 8K, 16K, 32K tokens (a few minutes on 2 CPU cores)
    python benchmarks/prefill.py --quick    # 1K and 2K tokens (smoke run, used by tests)

For each prompt length: the scratch memory XLA's compiler reports for prefill plus one new token (nothing is run to
get it), and, where that fits the budget, the time of a real greedy `generate` of one token after the prompt and
whether both ways produce the same token. The one-pass column is the reference: the same model and code with the
whole prompt in one chunk, whose `[prompt, prompt]` scores make memory quadratic in the length.
"""
import argparse
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--chunk', type=int, default=1024)
    ap.add_argument('--budget-gib', type=float, default=8.0, help='run a configuration only if it compiles below this')
    a = ap.parse_args(argv)
    import numpy as np
    from flax import nnx

    from xgen_small.config import get_preset
    from xgen_small.generate import generate, prefill_memory_gib
    from xgen_small.model import Decoder
    lengths = (1024, 2048) if a.quick else (4096, 8192, 16384, 32768)
    chunk = min(a.chunk, 512) if a.quick else a.chunk
    print(f'prefill of one prompt, tiny model, chunks of {chunk}; memory: compiled scratch (GiB); '
          'time: prefill + 1 token')
    print(f"{'tokens':>7} | {'one pass GiB':>12} {'chunked GiB':>11} | {'one pass s':>10} {'chunked s':>9} "
          '| same token')
    rows = []
    for L in lengths:
        model = Decoder(get_preset('tiny', max_seq_len=L + 16), rngs=nnx.Rngs(0))
        prompt = np.random.default_rng(0).integers(5, 4000, L).tolist()
        r = dict(tokens=L, one_pass_gib=prefill_memory_gib(model, L, L),
                 chunked_gib=prefill_memory_gib(model, L, chunk))
        for name, c in (('one_pass', L), ('chunked', chunk)):
            if r[f'{name}_gib'] > a.budget_gib: r[f'{name}_s'] = None; continue
            generate(model, [prompt], 1, prefill_chunk=c, bucket=chunk)            # compile
            t0 = time.perf_counter(); out = generate(model, [prompt], 1, prefill_chunk=c, bucket=chunk)
            r[f'{name}_s'], r[f'{name}_token'] = time.perf_counter() - t0, out.tokens[0]
        same = r.get('one_pass_token') == r.get('chunked_token') if r['one_pass_s'] is not None else 'n/a'
        r['same'] = same
        fmt = lambda v: f'{v:.1f}' if v is not None else 'over budget'
        print(f"{L:>7,} | {r['one_pass_gib']:>12.2f} {r['chunked_gib']:>11.2f} | {fmt(r['one_pass_s']):>10} "
              f"{fmt(r['chunked_s']):>9} | {same}", flush=True)
        rows.append(r)
    return rows


if __name__ == '__main__':
    main()
