"""Attention implementations in a full training step: time and peak memory of a forward + backward pass
of the tiny model at 1K-32K tokens.

    python benchmarks/attention.py            # 1K, 4K, 16K, 32K (several minutes on 2 CPU cores)
    python benchmarks/attention.py --quick    # 256 tokens (smoke run, used by tests)

Each configuration runs in a fresh process, so that its peak resident memory (ru_maxrss) is its own.
"compiled" is the scratch memory XLA's compiler reports for the step; configurations whose compiled
scratch exceeds the budget are reported but not run. Pallas kernels (flash, splash) run in interpret
mode on a CPU, which checks correctness, not speed: they are timed at the smallest length only.
The tiny model uses remat='full' so that memory is dominated by attention, not stored activations.
"""
import argparse
import json
import subprocess
import sys

CHILD = r'''
import json, resource, sys, time
import jax, jax.numpy as jnp, optax
from flax import nnx
from xgen_small.config import get_preset
from xgen_small.model import Decoder
T, impl, budget_mib = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
cfg = get_preset('tiny', max_seq_len=T, attention_impl=impl, remat='full', attn_block_q=512 if impl != 'flash' else 128,
                 attn_block_kv=512 if impl != 'flash' else 128)
model = Decoder(cfg, rngs=nnx.Rngs(0))
tok = jax.random.randint(jax.random.key(0), (1, T), 0, cfg.vocab_size)
g, st = nnx.split(model)
def loss(s):
    logits = nnx.merge(g, s)(tok)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tok[:, 1:]))
t0 = time.time()
c = jax.jit(jax.value_and_grad(loss)).lower(st).compile()
out = dict(compiled_mib=c.memory_analysis().temp_size_in_bytes / 2**20, compile_s=time.time() - t0)
if out['compiled_mib'] <= budget_mib:
    t0 = time.time(); l, gr = c(st); jax.block_until_ready(gr); out['step_s'] = time.time() - t0
    t0 = time.time(); l, gr = c(st); jax.block_until_ready(gr); out['step_s'] = min(out['step_s'], time.time() - t0)
    out['peak_rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
'''


def measure(T, impl, budget_mib, timeout=3600):
    r = subprocess.run(
        [sys.executable, '-c', CHILD, str(T), impl, str(budget_mib)], capture_output=True, text=True, timeout=timeout
    )
    if r.returncode: return dict(error=r.stderr.strip().splitlines()[-1][:120])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument(
        '--budget-gib', type=float, default=8.0, help='do not run configurations whose compiled scratch exceeds this'
    )
    a = ap.parse_args(argv)
    sizes = [256] if a.quick else [1024, 4096, 16384, 32768]
    impls = ['xla', 'blockwise', 'flash', 'splash']
    print(f"attention benchmark: tiny model, 1 sequence, forward + backward, remat='full', CPU")
    print(f"{'tokens':>7} {'impl':10} {'compiled MiB':>13} {'peak RSS MiB':>13} {'step s':>8}")
    rows = []
    for T in sizes:
        for impl in impls:
            interpret = impl in ('flash', 'splash')
            if interpret and T > sizes[0]: continue
            r = dict(tokens=T, impl=impl, **measure(T, impl, a.budget_gib * 1024))
            rows.append(r)
            if 'error' in r: print(f'{T:>7} {impl:10} error: {r["error"]}'); continue
            peak = f"{r['peak_rss_mib']:>13,.0f}" if 'peak_rss_mib' in r else f"{'not run':>13}"
            step = f"{r['step_s']:>8.2f}" if 'step_s' in r else f"{'-':>8}"
            print(
                f"{T:>7} {impl:10} {r['compiled_mib']:>13,.0f} {peak} {step}"
                + ('  (interpret mode)' if interpret else '')
            )
    blockwise = {r['tokens']: r for r in rows if r['impl'] == 'blockwise' and 'peak_rss_mib' in r}
    longest = max(blockwise)
    print(f"\nlongest blockwise step: {longest} tokens, peak RSS {blockwise[longest]['peak_rss_mib'] / 1024:.2f} GiB "
          f"({'within' if blockwise[longest]['peak_rss_mib'] < 4096 else 'OVER'} the 4 GiB target)")
    return rows


if __name__ == '__main__':
    main()
