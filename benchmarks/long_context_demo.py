"""Passkey retrieval by length before and after length extension, on the tiny model (issue 7's target).

    python benchmarks/long_context_demo.py                 # the full recipe, about 20 minutes on 2 CPU cores
    python benchmarks/long_context_demo.py --steps-scale 0.1   # a quick pass through every stage

Recipe: pre-train the tiny model in two phases with the training loop of notebook 15 (a `bootstrap` phase of short
key-value recall documents at 128 tokens, then 512 tokens of natural text plus the long mixture's retrieval
documents), evaluate RULER's `niah_single` (5-digit values) at 512 / 1K / 2K / 4K, run the CPU extension recipe
of notebook 20 (1K, 2K, then 4K over-length; sequence-parallel when the host has several devices), evaluate again,
and print a table of exact match by length, plus loss by position on 4K-token natural documents.

Target (issue 7): at least 90% at 2K (4x the pre-training length) after extension, with the pre-trained model
collapsing beyond 512. Status: not reached; see notebook 20 for the numbers and why.
"""
import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--steps-scale', type=float, default=1.0, help='multiply every phase and stage length')
    ap.add_argument('--n', type=int, default=24, help='prompts per length')
    ap.add_argument('--out', default=None, help='working directory (default: a temporary one)')
    a = ap.parse_args(argv)
    import jax
    import numpy as np
    from xgen_small import ruler
    from xgen_small.config import get_preset
    from xgen_small.data.sample import load_sample
    from xgen_small.evaluate import evaluate_ruler, perplexity_by_position, ruler_table, with_max_seq_len
    from xgen_small.extend import EXTENSION_PRESETS, extend, long_context_records, recall_document, write_store
    from xgen_small.schedules import LRPhase
    from xgen_small.tokenizer import Tokenizer, train_tokenizer
    from xgen_small.train import TrainConfig, train

    work = Path(a.out or tempfile.mkdtemp())
    steps = lambda n: max(2, round(n * a.steps_scale))
    sample = load_sample()
    tok = Tokenizer(train_tokenizer([d['text'] for d in sample[:600]], 4096))
    natural = [dict(text=d['text'], domain=d['domain']) for d in sample]
    rc = ruler.RulerConfig(digits=5)

    def recall_records(n_tokens, seed):
        rng, out, n = np.random.default_rng(seed), [], 0
        while n < n_tokens:
            ids = recall_document(tok, rng)
            out.append(dict(text=tok.decode(ids), domain='retrieval')); n += len(ids)
        return out

    t0 = time.perf_counter()
    boot_cfg = TrainConfig(model=get_preset('tiny'), seq_len=128, batch_size=32, split='boundary', save_every=100_000,
                           schedule=(LRPhase('bootstrap', steps(500), 1e-2, min(20, steps(500)), 'constant'),))
    boot = train(boot_cfg, write_store(recall_records(128 * 32 * (steps(500) + 60), 0), tok, work / 'boot_data'), work / 'boot',
                 progress=False)
    recs, _ = long_context_records(tok, natural, 512, 512 * 8 * (steps(200) + 30),
                                   (('long_natural', 0.2), ('concatenated', 0.2), ('retrieval', 0.6)), seed=1)
    pre_cfg = replace(boot_cfg, seq_len=512, batch_size=8, schedule=(LRPhase('pretrain', steps(200), 3e-3, min(10, steps(200)), 'cosine', 3e-4),))
    pre = train(pre_cfg, write_store(recs, tok, work / 'pre_data'), work / 'pre', progress=False,
                init_params=jax.device_get(boot.state['params']))
    print(f"pre-training: bootstrap loss {boot.history[-1]['loss']:.3f}, 512-token loss {pre.history[-1]['loss']:.3f} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    lengths = (512, 1024, 2048, 4096)
    pre_model = with_max_seq_len(pre.model(), 4096)
    before = evaluate_ruler(pre_model, tok, ('niah_single',), lengths, n=a.n, cfg=rc)
    t0 = time.perf_counter()
    ext = extend(EXTENSION_PRESETS['cpu'], jax.device_get(pre.state['params']), pre_cfg, tok, natural, work / 'ext',
                 progress=False, steps_scale=a.steps_scale)
    print(f'extension: {time.perf_counter() - t0:.0f}s', flush=True)
    for s in ext.stages:
        print(f"  {s['stage']:>10}: {s['seq_len']:>5} tokens, base {s['rope_theta']:>8,.0f}, final loss {s['loss']:.3f}, {s['seconds']}s")
    ext_model = ext.model()
    after = evaluate_ruler(ext_model, tok, ('niah_single',), lengths, n=a.n, cfg=rc)
    rows = [dict(r, task='pre-trained at 512') for r in before] + [dict(r, task='after 1K -> 2K -> 4K') for r in after]
    print(ruler_table(rows, title='passkey exact match, %'))

    long_store = write_store(long_context_records(tok, natural, 4096, 4096 * 24, (('long_natural', 0.5), ('concatenated', 0.5),
                                                                                   ('retrieval', 0.0)), seed=99)[0], tok, work / 'ppl_data')
    print('\n| positions | loss before | loss after |\n|---|---:|---:|')
    for b, c in zip(perplexity_by_position(pre_model, long_store, 4096), perplexity_by_position(ext_model, long_store, 4096)):
        print(f"| {b['start']}-{b['end']} | {b['loss']:.3f} | {c['loss']:.3f} |")
    got = {r['length']: r['exact'] for r in after}
    print(f"\ntarget: >= 90% at 2048 after extension: {'met' if got[2048] >= 0.9 else 'NOT met'} ({100 * got[2048]:.0f}%)")


if __name__ == '__main__':
    main()
