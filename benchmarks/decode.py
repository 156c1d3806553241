"""Decode throughput: our jitted KV-cache generator vs `transformers` `generate`, same weights, same run.

    python benchmarks/decode.py            # full table
    python benchmarks/decode.py --quick    # smoke run (used by tests/test_benchmarks.py)

Both decode greedily from identical prompts with float32 weights on the CPU; the first call of each
is a warm-up (ours compiles there). We also check that both produce the same tokens.
"""
import argparse
import os
import platform
import tempfile
import time

import numpy as np


def _best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='tiny sizes, one repeat')
    ap.add_argument('--preset', default='tiny')
    a = ap.parse_args(argv)

    import jax
    import torch
    from flax import nnx
    from transformers import LlamaForCausalLM

    from xgen_small.config import get_preset
    from xgen_small.generate import generate
    from xgen_small.hf import save_hf_checkpoint
    from xgen_small.model import Decoder

    torch.set_num_threads(os.cpu_count())
    cfg = get_preset(a.preset, compute_dtype='float32', max_seq_len=2048)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as d:
        save_hf_checkpoint(model, d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()

    cases = [(1, 32, 16)] if a.quick else [(1, 32, 256), (8, 32, 256), (32, 128, 128)]
    repeats = 1 if a.quick else 3
    print(f'decode benchmark: preset {a.preset}, greedy, float32; {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} CPUs, jax {jax.__version__}, torch {torch.__version__}')
    print(
        f"{'batch':>5} {'prompt':>6} {'new':>5} | {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>6} | same "
        "tokens"
    )
    rows = []
    rng = np.random.default_rng(0)
    for batch, prompt_len, new in cases:
        prompts = rng.integers(1, cfg.vocab_size, size=(batch, prompt_len))
        ours = lambda: generate(model, prompts.tolist(), new)
        ids = torch.as_tensor(prompts)
        theirs = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, pad_token_id=0, eos_token_id=None)
        ours(); theirs()                                              # warm-up / compile
        t_ours, out_ours = _best_of(ours, repeats)
        with torch.no_grad(): t_hf, out_hf = _best_of(theirs, repeats)
        same = np.mean(np.asarray(out_ours.tokens) == out_hf[:, prompt_len:].numpy())
        r = dict(batch=batch, prompt=prompt_len, new=new, ours=batch * new / t_ours, hf=batch * new / t_hf, same=same)
        rows.append(r)
        print(
            f"{batch:>5} {prompt_len:>6} {new:>5} | {r['ours']:>11,.0f} {r['hf']:>19,.0f} "
            f"{r['ours'] / r['hf']:>5.1f}x | {same:.1%}"
        )
    return rows


if __name__ == '__main__':
    main()
