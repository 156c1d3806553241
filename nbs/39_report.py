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
# # The report
#
# > The run's report: `summary.md` and its figures, read back from stage markers and training histories.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/39_report.ipynb)

# %%
#| default_exp report

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

# %% [markdown]
# Every earlier notebook builds and tests one stage. This one chains them, the way the paper's pipeline is
# "vertically integrated": each stage reads only what the previous ones wrote to disk, so a run can stop anywhere
# (a crash, a pre-empted TPU, a closed laptop) and pick up where it was.
#
# The stages, what each does and writes, are in the table of stages below (`stage_markdown()` prints it from the
# pipeline's own `STAGE_TABLE`, so it cannot drift from the code).
#
# **How resumption works.** A stage's configuration (its own settings, plus the fingerprints of every stage it
# reads from) hashes to a *fingerprint*. When a stage finishes it writes `<stage>/stage.json` holding that
# fingerprint and its summary numbers, after everything else, so the marker exists only if the outputs do. On the
# next run a stage is skipped when its marker has the expected fingerprint *and* its outputs are still there
# (the checkpoint at its last step, the tokenizer with the recorded fingerprint, ...). A stage that was
# interrupted has no marker; it runs again, and the training stages continue from their last checkpoint rather than
# from scratch. A directory made with a *different* configuration is never silently reused: the run stops and
# says which stage differs, and `--redo STAGE` discards that stage and everything after it.

# %%
#| export
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

# %%
import tempfile

from fastcore.test import test_eq

# %% [markdown]
# The report stage of the pipeline (notebook 40) writes what a reader wants after a run: `summary.md`, with every
# stage's numbers read from the stage markers (so a resumed run reports the whole run and not just its last piece) and
# the evaluation tables, four plots, and the final model exported by notebook 17's `export_model`. Everything here
# reads files, never a live Python object, so a report can be rebuilt from a run directory alone. The functions take
# the run as any object with `cfg` (the `PipelineConfig`), `out`, `dir(stage)` and `marker(stage)`; notebook 40's
# `Pipeline` is one, and its quick pass through every stage shows the report this notebook's code writes.
#
# Training histories are JSON lines appended as steps happen (notebook 18's `MetricsLog`). A run that was
# interrupted and resumed logs the steps after its last checkpoint twice; `read_history` keeps the latest record
# of each step, which is the one the finished run's parameters came from:

# %%
#| export
def read_history(path) -> list[dict]:
    "A run's logged steps; where a resumed run logged a step again, its latest record (history.jsonl only appends)."
    p = Path(path) / 'history.jsonl'
    rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
    return sorted({r['step']: r for r in rows}.values(), key=lambda r: r['step'])

# %%
#| export
def report_figures(p, sums: dict, out) -> list[str]:
    "Loss curves, LR and mixture schedule, RULER heatmap with passkey by length, RL reward: PNGs in `out`."
    import matplotlib.pyplot as plt

    from xgen_small.evaluate import ruler_heatmap
    plt.switch_backend('Agg')                      # files only: no display needed, none assumed
    out, names = Path(out), []
    pre = read_history(p.dir('pretrain'))
    def save(fig, name):
        fig.tight_layout(); fig.savefig(out / name, dpi=90); plt.close(fig); names.append(name)

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    ax[0].plot([h['step'] for h in pre], [h['loss'] for h in pre], lw=1, label='pre-training')
    for ph in dict.fromkeys(h['phase'] for h in pre):
        first = next(h['step'] for h in pre if h['phase'] == ph)
        if first > 1:
            ax[0].axvline(first, color='grey', ls=':', lw=1)
            ax[0].text(first, ax[0].get_ylim()[1], f' {ph}', va='top', fontsize=8)
    off = pre[-1]['step']
    for st in p.cfg.extension.stages:
        h = read_history(p.dir('extend') / st.name)
        ax[0].plot(
            [off + x['step'] for x in h], [x['loss'] for x in h], lw=1, label=f'{st.name} ({st.seq_len:,} tokens)'
        )
        off += st.steps
    ax[0].set(xlabel='step', ylabel='loss', title='pre-training and length extension', yscale='log')
    ax[0].legend(fontsize=8)
    for s in ('sft', 'dpo'):                        # RL's loss is ~0 by construction: its reward has its own plot
        h = read_history(p.dir(s))
        ax[1].plot([x['step'] for x in h], [x['loss'] for x in h], lw=1, label=s)
    ax[1].set(xlabel='step', ylabel='loss', title='post-training'); ax[1].legend(fontsize=8)
    save(fig, 'loss.png')

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.4))
    ax[0].plot([h['step'] for h in pre], [h['lr'] for h in pre], lw=1.5)
    ax[0].set(xlabel='pre-training step', ylabel='learning rate', title='multi-phase learning rate')
    mix = sums['curate']['mixture']
    domains = sorted({d for ph in mix.values() for d in ph['shares']})
    bottom = np.zeros(len(mix))
    for dom in domains:
        v = np.array([mix[ph]['shares'].get(dom, 0.0) for ph in mix])
        ax[1].bar(list(mix), v, bottom=bottom, label=dom); bottom += v
    ax[1].set(ylabel='share of tokens', title='mixture by phase (quality annealing)')
    ax[1].legend(fontsize=8, loc='center left', bbox_to_anchor=(1, 0.5))
    save(fig, 'schedule.png')

    res = json.loads((p.dir('eval') / 'results.json').read_text())
    fig, ax = plt.subplots(
        1, 2, figsize=(11, 0.45 * len(p.cfg.eval.tasks) + 1.8), gridspec_kw=dict(width_ratios=(3, 2))
    )
    ruler_heatmap(res['ruler'], ax=ax[0], title='RULER exact match (%), final model')
    labels = dict(pretrain='pre-trained', extend='extended', rl='final (after RL)')
    lengths = sorted(p.cfg.eval.lengths)
    for k, (s, rows) in enumerate(res['passkey'].items()):  # lengths evenly spaced; markers offset so ties stay visible
        ax[1].plot(
            [lengths.index(r['length']) + 0.06 * (k - 1) for r in rows],
            [100 * r['exact'] for r in rows],
            'o-',
            label=labels[s],
        )
    ax[1].set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax[1].set(xlabel='context length (tokens)', ylabel='passkey exact match (%)', ylim=(-5, 105),
              title=f'single needle by length (pre-trained at {p.cfg.pretrain.seq_len})'); ax[1].legend(fontsize=8)
    save(fig, 'ruler.png')

    h = read_history(p.dir('rl'))
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot([x['step'] for x in h], [x['reward'] for x in h], label='mean reward of the batch')
    ax.plot([x['step'] for x in h], [x['accuracy'] for x in h], alpha=0.6, label='fraction of samples right')
    ax.set(xlabel='RL step', ylim=(0, 1), title='GRPO on arithmetic'); ax.legend(fontsize=8)
    save(fig, 'rl_reward.png')
    return names

def _pct(x) -> str: return f'{100 * x:.0f}%'

def _anneal_result(pt: dict) -> str:
    "The pre-training row's note on the anneal ablation (empty when the run had none)."
    a = pt.get('anneal_ablation')
    if not a: return ''
    last, l = list(a['loss']['anneal'])[-1], a['loss']
    return (f"; held-out {last}-mixture loss {l['anneal'][last]:.3f} with the {last} phase, "
            f"{l['no_anneal'][last]:.3f} without it")

def _bootstrap_result(pt: dict) -> str:
    "The pre-training row's note on the copy bootstrap (empty when the run had none)."
    b = pt.get('copy_bootstrap')
    return f"; after a {b['steps']}-step copy bootstrap (key-value recall {b['recall']:.0%})" if b else ''

def _anneal_table(pt: dict) -> list:
    "The ablation's table: held-out loss under each phase's mixture, for the run with and without its last phase."
    a = pt.get('anneal_ablation')
    if not a: return []
    phases, l = list(a['loss']['anneal']), a['loss']
    return [
        '',
        f"**Quality annealing, ablated.** From the step-{a['branch_step']} checkpoint the run trained its last phase "
        f"(`{phases[-1]}`) a second time on the `{phases[0]}` mixture, with the same steps and learning rates. Both "
        f"runs' loss on {a['held_out_docs']:,} kept documents that pre-training never saw ({a['held_out_tokens']:,} "
        "tokens), each document weighted as that phase's mixture draws it:",
        '',
        '| run | ' + ' | '.join(f'held-out loss, `{ph}` mixture' for ph in phases) + ' |',
        '|---|' + '---:|' * len(phases),
        f"| with the `{phases[-1]}` phase | " + ' | '.join(f"{l['anneal'][ph]:.3f}" for ph in phases) + ' |',
        f"| `{phases[0]}` mixture to the end | " + ' | '.join(f"{l['no_anneal'][ph]:.3f}" for ph in phases) + ' |',
        '| difference (95% interval, documents resampled) | ' + ' | '.join(
            f"{l['no_anneal'][ph] - l['anneal'][ph]:+.3f} ({a['gap_95'][ph][0]:+.3f} to {a['gap_95'][ph][1]:+.3f})"
            for ph in phases) + ' |',
    ]

def report_markdown(p, sums: dict, figures=()) -> str:
    "The run's `summary.md`: every stage's numbers and time, the evaluation tables, the figures, the exported model."
    from xgen_small.config import num_params
    from xgen_small.evaluate import ruler_table
    c, L = p.cfg, []
    m = c.pretrain.model
    L += [
        '# xgen_small pipeline report',
        '',
        f"Run directory `{p.out}`; {num_params(m):,}-parameter model ({m.n_layers} layers x d_model {m.d_model}), "
        f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s). Every number below comes from the stage "
        "markers "
        f"(`<stage>/stage.json`), so a resumed run reports all of its stages.",
        '',
        '| stage | seconds | result |',
        '|---|---:|---|',
    ]
    cu, tk, pt = sums['curate'], sums['tokenizer'], sums['pretrain']
    ex, sf, dp, rl, ev = (sums[s] for s in ('extend', 'sft', 'dpo', 'rl', 'eval'))
    L_eval = max(c.eval.lengths)
    result = {
        'curate': f"{cu['lines']:,} documents: {cu['kept']:,} kept, {cu['dropped']:,} dropped",
        'tokenizer': f"{tk['vocab_size']:,} pieces, {tk['bytes_per_token']:.2f} bytes per token",
        'pretrain': f"{pt['steps']} steps, {pt['tokens']:,} tokens, "
                    f"loss {pt['first_loss']:.2f} -> {pt['final_loss']:.3f}"
                    + _bootstrap_result(pt) + _anneal_result(pt),
        'extend': ', '.join(f"{s['seq_len']:,}: loss {s['loss']:.3f}" for s in ex['stages']),
        'sft': f"right replies {_pct(sf['before']['reply_accuracy']['all'])} -> "
               f"{_pct(sf['after']['reply_accuracy']['all'])}",
        'dpo': f"held-out math {_pct(dp['before']['held_out_math'])} -> {_pct(dp['after']['held_out_math'])}, "
        f"reward accuracy {_pct(dp['reward_accuracy'])}",
        'rl': f"batch reward {rl['reward_first']:.2f} -> {rl['reward_last']:.2f}, "
              f"held-out math {_pct(rl['before']['held_out_math'])} -> "
        f"{_pct(rl['after']['held_out_math'])}",
        'eval': f"passkey at {L_eval:,} tokens: pre-trained {_pct(ev['passkey']['pretrain'][str(L_eval)])}, "
        f"extended {_pct(ev['passkey']['extend'][str(L_eval)])}, final {_pct(ev['passkey']['rl'][str(L_eval)])}",
    }
    for s in result:
        mk = p.marker(s)
        L.append(f"| `{s}` | {mk['seconds'] if mk else float('nan'):.0f} | {result[s]} |")
    L += ['', '## Curation', '', '| dropped because | documents |', '|---|---:|']
    L += [f'| `{r}` | {n:,} |' for r, n in sorted(cu['reasons'].items(), key=lambda kv: -kv[1])]
    doms = sorted({d for ph in cu['mixture'].values() for d in ph['shares']})
    L += ['', '| mixture phase | tokens | ' + ' | '.join(doms) + ' |', '|---|---:|' + '---:|' * len(doms)]
    L += [
        f"| {ph} | {sum(v['tokens'].values()):,.0f} | " + ' | '.join(_pct(v['shares'].get(d, 0)) for d in doms) + ' |'
        for ph, v in cu['mixture'].items()
    ]
    L += [
        '',
        '## Pre-training and length extension',
        '',
        f"{pt['steps']} steps of {c.pretrain.batch_size} x {c.pretrain.seq_len} tokens over a "
        f"{pt['store_tokens']:,}-token store; "
        f"median {pt['tokens_per_s']:,.0f} tokens/s. Loss at the end of each phase: "
        + ', '.join(f'{k} {v:.3f}' for k, v in pt['loss_at_phase_end'].items())
        + '.',
        '',
        '| stage | length | RoPE base | tokens | final loss |',
        '|---|---:|---:|---:|---:|',
    ]
    L += [
        f"| {s['stage']} | {s['seq_len']:,} | {s['rope_theta']:,.0f} | {s['tokens']:,} | {s['loss']:.3f} |"
        for s in ex['stages']
    ]
    L += _anneal_table(pt)
    L += [
        '',
        '## Post-training',
        '',
        '| stage | steps | loss | held-out math, before -> after |',
        '|---|---:|---:|---:|',
    ]
    for s, v in (('sft', sf), ('dpo', dp), ('rl', rl)):
        L.append(f"| {s} | {v['steps']} | {v['first_loss']:.3f} -> {v['final_loss']:.3f} | "
                 f"{_pct(v['before']['held_out_math'])} -> {_pct(v['after']['held_out_math'])} |")
    ra = sf['after']['reply_accuracy']
    L += ['', 'Right replies after SFT on 64 held-out generated conversations: '
          + ', '.join(f'{k} {_pct(v)}' for k, v in ra.items()) + '.']
    res = json.loads((p.dir('eval') / 'results.json').read_text())
    L += [
        '',
        '## Long-context evaluation',
        '',
        ruler_table(res['ruler'], title='final model: task'),
        '',
        ruler_table(
            [
                dict(r, task={'pretrain': 'pre-trained', 'extend': 'extended', 'rl': 'final'}[s])
                for s, rows in res['passkey'].items()
                for r in rows
            ],
            title='passkey: model',
        ),
        '',
        f"Loss by position on {L_eval:,}-token rows of the extension's long documents:",
        '',
        '| positions | pre-trained | extended |',
        '|---|---:|---:|',
    ]
    loss = lambda b: f"{b['loss']:.3f}" if b['tokens'] else 'no tokens'
    L += [
        f"| {a['start']}-{a['end']} | {loss(a)} | {loss(b)} |"
        for a, b in zip(res['perplexity']['pretrain'], res['perplexity']['extend'])
    ]
    L += ['', '## Figures', ''] + [f'![{f[:-4]}]({f})' for f in figures]
    L += [
        '',
        '## The model',
        '',
        '- `model/checkpoints`: orbax, parameters only: `xgen_small.checkpoint.load_run("model")`, `xgen-small eval '
        '--run model`',
        '- `model/hf`: Llama-format safetensors and config.json: `xgen_small.hf.load_hf_checkpoint("model/hf")` or '
        '`transformers.LlamaForCausalLM.from_pretrained("model/hf")`',
        '- `model/tokenizer.model`: the sentencepiece model (`xgen_small.tokenizer.Tokenizer`)',
        '',
    ]
    return '\n'.join(L)


# %%
run_dir = Path(tempfile.mkdtemp())
lines = [dict(step=1, loss=3.0), dict(step=2, loss=2.9), dict(step=3, loss=2.8),     # interrupted after step 3,
         dict(step=3, loss=2.7), dict(step=4, loss=2.6)]                              # resumed from the step-2 checkpoint
(run_dir / 'history.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
read_history(run_dir)

# %%
test_eq([(h['step'], h['loss']) for h in read_history(run_dir)], [(1, 3.0), (2, 2.9), (3, 2.7), (4, 2.6)])
test_eq(read_history(run_dir / 'nothing'), [])
test_eq(_pct(0.256), '26%')

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
