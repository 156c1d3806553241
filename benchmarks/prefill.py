"""Long-prompt prefill: memory-linear (blockwise attention by position, in chunks or one pass) against the reference
attention, the tiny model on this CPU.

    python benchmarks/prefill.py            # 8K, 16K, 32K, 64K tokens (several minutes on 2 CPU cores)
    python benchmarks/prefill.py --quick    # 1K and 2K tokens (smoke run, used by tests)

For each prompt length: the scratch memory XLA's compiler reports for prefill plus one new token (nothing is run to
get it), and, where that fits the budget, the time of a real greedy `generate` of one token after the prompt and
whether every way produces the same token. The reference is the same model and weights with
`attention_impl='xla'` prefilling the whole prompt in one pass, whose `[prompt, prompt]` scores make memory
quadratic in the length (what every prefill did before the cache path went blockwise).
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
    from xgen_small.model import Decoder, model_with_params, params_of
    lengths = (1024, 2048) if a.quick else (8192, 16384, 32768, 65536)
    chunk = min(a.chunk, 512) if a.quick else a.chunk
    print(f'prefill of one prompt, tiny model; memory: compiled scratch (GiB); time: prefill + 1 token (s)')
    ways = {'reference': ('xla', None), 'one_pass': ('auto', None), 'chunked': ('auto', chunk)}
    print(f"{'tokens':>7} | {'reference GiB':>13} {'one pass GiB':>12} {f'chunks of {chunk} GiB':>18} | "
          f"{'reference s':>11} {'one pass s':>10} {'chunked s':>9} | same token")
    rows = []
    for L in lengths:
        cfg = get_preset('tiny', max_seq_len=L + 16)
        model = Decoder(cfg, rngs=nnx.Rngs(0))
        models = {'xla': model_with_params(cfg.replace(attention_impl='xla'), params_of(model)), 'auto': model}
        prompt = np.random.default_rng(0).integers(5, 4000, L).tolist()
        r, tokens = dict(tokens=L), {}
        for name, (impl, c) in ways.items():
            r[f'{name}_gib'] = prefill_memory_gib(models[impl], L, c or L)
            if r[f'{name}_gib'] > a.budget_gib: r[f'{name}_s'] = None; continue
            generate(models[impl], [prompt], 1, prefill_chunk=c or L, bucket=chunk)            # compile
            t0 = time.perf_counter(); out = generate(models[impl], [prompt], 1, prefill_chunk=c or L, bucket=chunk)
            r[f'{name}_s'], tokens[name] = time.perf_counter() - t0, out.tokens[0]
        r['same'] = len(set(map(tuple, tokens.values()))) == 1
        fmt = lambda v: f'{v:.1f}' if v is not None else 'over budget'
        print(f"{L:>7,} | {r['reference_gib']:>13.2f} {r['one_pass_gib']:>12.2f} {r['chunked_gib']:>18.2f} | "
              f"{fmt(r['reference_s']):>11} {fmt(r['one_pass_s']):>10} {fmt(r['chunked_s']):>9} | "
              f"{r['same']} ({len(tokens)} ran)", flush=True)
        rows.append(r)
    return rows


if __name__ == '__main__':
    main()
