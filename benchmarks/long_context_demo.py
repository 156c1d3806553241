"""Passkey retrieval by length before and after length extension, on the tiny model (issue 7's target).

    python benchmarks/long_context_demo.py                 # the full recipe, about 35 minutes on 2 CPU cores
    python benchmarks/long_context_demo.py --steps-scale 0.1   # a quick pass through every stage

    python benchmarks/retrieval_probe.py --data recall --seq 128 --rows 32 --steps 800 --seed 1 --save /tmp/recall_ckpt
    python benchmarks/long_context_demo.py --bootstrap /tmp/recall_ckpt     # start from the probe's recall circuit
    # as in notebook 20, plus every RULER task:
    python benchmarks/long_context_demo.py --bootstrap /tmp/recall_ckpt --n 48 --ruler 8

Recipe: pre-train the tiny model with the training loop of notebook 18 in three phases: a `bootstrap` of short
key-value recall documents at 128 tokens (lr 3e-3, no weight decay; it forms the copy circuit, and the script
prints its recall accuracy), 300 steps of `niah_single` documents at 256 tokens, then 150 steps at 512 tokens of
70% needle documents and 30% natural text. Evaluate RULER's `niah_single` (5-digit values) at 512 / 1K / 2K / 4K,
run notebook 20's CPU extension recipe (1K, 2K, then 4K over-length; critical-pair RoPE bases, peak lr 3e-4,
80% retrieval documents; sequence-parallel when the host has several devices), evaluate again, and print exact match
by length, by needle depth, and loss by position on 4K-token natural documents. `--bootstrap` replaces the first
phase with parameters saved by `retrieval_probe.py`; how well a bootstrap transfers to the needle task varies from run
to run (notebook 20), and the numbers in notebook 20 come from the probe's seed-1 bootstrap.

Target (issue 7): at least 90% at 2K (4x the pre-training length) after extension, with the pre-trained model
collapsing beyond 512. Status (notebook 20, `--bootstrap`, `--n 48`): met; pre-trained 83 / 25 / 6 / 0%, extended
98 / 100 / 100 / 73% at 512 / 1K / 2K / 4K. `--ext-rope-rule ntk` reruns it with NTK-aware bases (2K: 67%).
"""
import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--steps-scale', type=float, default=1.0, help='multiply every phase and stage length')
    ap.add_argument('--n', type=int, default=24, help='prompts per length')
    ap.add_argument('--out', default=None, help='working directory (default: a temporary one)')
    ap.add_argument(
        '--ext-lr', type=float, default=None, help="the extension stages' peak lr (default: the CPU preset's)"
    )
    ap.add_argument('--ext-retrieval', type=float, default=None,
                    help="the extension stages' retrieval share, the rest split between long and concatenated text")
    ap.add_argument(
        '--ext-rope-rule',
        choices=('critical', 'ntk'),
        default=None,
        help="the rule for the extension stages' RoPE bases (default: the CPU preset's bases, critical-pair)",
    )
    ap.add_argument(
        '--ext-steps-scale',
        type=float,
        default=1.0,
        help="multiply the extension stages' steps (on top of --steps-scale)",
    )
    ap.add_argument('--ruler', type=int, default=0, metavar='N',
                    help='also score every RULER task at every length, N prompts each, before and after extension')
    ap.add_argument(
        '--bootstrap',
        default=None,
        help='parameters saved by `retrieval_probe.py --data recall --save PATH`: replace the bootstrap phase',
    )
    a = ap.parse_args(argv)
    import jax
    import numpy as np

    from xgen_small import ruler
    from xgen_small.config import get_preset
    from xgen_small.data.sample import load_sample
    from xgen_small.evaluate import (
        depth_table,
        evaluate_ruler,
        perplexity_by_position,
        ruler_by_depth,
        ruler_table,
        with_max_seq_len,
    )
    from xgen_small.extend import (
        EXTENSION_PRESETS,
        extend,
        long_context_records,
        recall_accuracy,
        recall_records,
        retrieval_documents,
        rope_base_for,
        write_store,
    )
    from xgen_small.model import model_with_params
    from xgen_small.schedules import LRPhase
    from xgen_small.tokenizer import Tokenizer, train_tokenizer
    from xgen_small.train import TrainConfig, train

    work = Path(a.out or tempfile.mkdtemp())
    steps = lambda n: max(2, round(n * a.steps_scale))
    sample = load_sample()
    tok = Tokenizer(train_tokenizer([d['text'] for d in sample[:600]], 4096))
    natural = [dict(text=d['text'], domain=d['domain']) for d in sample]
    rc = ruler.RulerConfig(digits=5)

    t0 = time.perf_counter()
    boot_cfg = TrainConfig(
        model=get_preset('tiny'),
        seq_len=128,
        batch_size=32,
        split='boundary',
        save_every=100_000,
        weight_decay=0.0,
        schedule=(LRPhase('bootstrap', steps(1200), 3e-3, min(50, steps(1200)), 'constant'),),
    )
    if a.bootstrap:
        import orbax.checkpoint as ocp
        boot_params = ocp.PyTreeCheckpointer().restore(Path(a.bootstrap).absolute())
        boot_model = model_with_params(boot_cfg.model, boot_params)
    else:
        boot = train(
            boot_cfg,
            write_store(recall_records(tok, 128 * 32 * (steps(1200) + 60), 0, 'retrieval'), tok, work / 'boot_data'),
            work / 'boot',
            progress=False,
        )
        boot_params, boot_model = jax.device_get(boot.state['params']), boot.model()

    def retrieval_records(n_tokens, max_len, seed, tasks):
        return [dict(text=tok.decode(ids), domain='retrieval')
                for ids in retrieval_documents(tok, n_tokens, max_len, seed, tasks=tasks, cfg=rc, copy_share=0.1)]

    print(
        f"bootstrap: recall exact match {100 * recall_accuracy(boot_model, tok):.0f}% on 32 held-out documents",
        flush=True,
    )
    drill_cfg = replace(
        boot_cfg,
        seq_len=256,
        batch_size=16,
        schedule=(LRPhase('needle', steps(300), 3e-3, min(50, steps(300)), 'constant'),),
    )
    drill = train(
        drill_cfg,
        write_store(
            retrieval_records(256 * 16 * (steps(300) + 30), 256, 2, ('niah_single',)), tok, work / 'needle_data'
        ),
        work / 'needle',
        progress=False,
        init_params=boot_params,
    )
    print(
        ruler_table(
            [
                dict(r, task='after the needle phase at 256')
                for r in evaluate_ruler(
                    with_max_seq_len(drill.model(), 1024), tok, ('niah_single',), (256, 512, 1024), n=a.n, cfg=rc
                )
            ],
            title='passkey exact match, %',
        ),
        flush=True,
    )
    n_pre = 512 * 8 * (steps(150) + 30)
    recs = retrieval_records(int(0.7 * n_pre), 512, 3, ('niah_single',) * 3 + ('niah_multikey', 'niah_multiquery'))
    rng, n = np.random.default_rng(4), 0
    for i in rng.permutation(len(natural)):
        if n >= 0.3 * n_pre: break
        recs.append(dict(text=natural[i]['text'], domain='natural')); n += len(tok.encode(natural[i]['text']))
    recs = [recs[i] for i in rng.permutation(len(recs))]
    pre_cfg = replace(
        boot_cfg,
        seq_len=512,
        batch_size=8,
        schedule=(LRPhase('pretrain', steps(150), 1e-3, min(10, steps(150)), 'cosine', 1e-4),),
    )
    pre = train(pre_cfg, write_store(recs, tok, work / 'pre_data'), work / 'pre', progress=False,
                init_params=jax.device_get(drill.state['params']))
    # also when a finished run was resumed
    last = json.loads((work / 'pre' / 'history.jsonl').read_text().splitlines()[-1])
    print(f"pre-training: 512-token loss {last['loss']:.3f} "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)

    lengths = (512, 1024, 2048, 4096)
    pre_model = with_max_seq_len(pre.model(), 4096)
    before = evaluate_ruler(pre_model, tok, ('niah_single',), lengths, n=a.n, cfg=rc, keep_outputs=True)
    print(ruler_table([dict(r, task='pre-trained at 512') for r in before], title='passkey exact match, %'), flush=True)
    t0 = time.perf_counter()
    recipe = EXTENSION_PRESETS['cpu']
    if a.ext_lr or a.ext_retrieval is not None or a.ext_rope_rule:
        def stage(st):
            lr = a.ext_lr or st.peak_lr
            mix = (
                st.mixture
                if a.ext_retrieval is None
                else (
                    ('long_natural', (1 - a.ext_retrieval) / 2),
                    ('concatenated', (1 - a.ext_retrieval) / 2),
                    ('retrieval', a.ext_retrieval),
                )
            )
            theta = (
                st.rope_theta
                if not a.ext_rope_rule
                else rope_base_for(  # the over-length stage keeps its target's base
                    recipe.base_theta,
                    pre_cfg.model.head_dim,
                    recipe.base_len,
                    st.seq_len // 2 if st.overlength else st.seq_len,
                    a.ext_rope_rule,
                )
            )
            return replace(
                st, peak_lr=lr, final_lr=st.final_lr * lr / st.peak_lr, mixture=mix, rope_theta=theta
            )  # keep the preset's decay ratio
        recipe = replace(recipe, stages=tuple(stage(st) for st in recipe.stages))
    ext = extend(recipe, jax.device_get(pre.state['params']), pre_cfg, tok, natural, work / 'ext',
                 progress=False, steps_scale=a.steps_scale * a.ext_steps_scale)
    print(f'extension: {time.perf_counter() - t0:.0f}s', flush=True)
    for s in ext.stages:
        print(
            f"  {s['stage']:>10}: {s['seq_len']:>5} tokens, base {s['rope_theta']:>8,.0f}, final loss "
            f"{s['loss']:.3f}, {s['seconds']}s"
        )
    ext_model = ext.model()
    after = evaluate_ruler(ext_model, tok, ('niah_single',), lengths, n=a.n, cfg=rc, keep_outputs=True)
    rows = [dict(r, task='pre-trained at 512') for r in before] + [dict(r, task='after 1K -> 2K -> 4K') for r in after]
    print(ruler_table(rows, title='passkey exact match, %', mean=False))
    for name, rs in (('pre-trained', before), ('extended', after)):
        print(f'\n{name}, by needle depth (0% = the start of the prompt, farthest from the question):')
        print(depth_table(ruler_by_depth([r for r in rs if r['length'] >= 1024]), title='length'))

    long_store = write_store(
        long_context_records(
            tok, natural, 4096, 4096 * 24, (('long_natural', 0.5), ('concatenated', 0.5), ('retrieval', 0.0)), seed=99
        )[0],
        tok,
        work / 'ppl_data',
    )
    print('\n| positions | loss before | loss after |\n|---|---:|---:|')
    for b, c in zip(
        perplexity_by_position(pre_model, long_store, 4096), perplexity_by_position(ext_model, long_store, 4096)
    ):
        print(f"| {b['start']}-{b['end']} | {b['loss']:.3f} | {c['loss']:.3f} |")
    if a.ruler:
        for name, m in (('pre-trained', pre_model), ('extended', ext_model)):
            print(f'\n{name}, every RULER task ({a.ruler} prompts per cell):')
            print(
                ruler_table(
                    # cwe's list needs > 512 tokens
                    evaluate_ruler(m, tok, ruler.TASKS, lengths[1:], n=a.ruler, cfg=rc),
                    title='exact match, %',
                ),
                flush=True,
            )
    got = {r['length']: r['exact'] for r in after}
    print(
        f"\ntarget: >= 90% at 2048 after extension: {'met' if got[2048] >= 0.9 else 'NOT met'} ({100 * got[2048]:.0f}%)"
    )


if __name__ == '__main__':
    main()
