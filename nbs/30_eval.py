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
# # Evaluation: perplexity by position and RULER by length
#
# > Loss by position and RULER by length: does the model use more context, and does retrieval hold?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/30_eval.ipynb)

# %%
#| default_exp evaluate

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
                    'lm_eval==0.4.13', 'accelerate==1.15.0', 'transformers==5.23.0', 'datasets==5.2.0',
                    'xgen_small @ git+https://github.com/xgen-small/xgen_small'], check=True)

# %% [markdown]
# Two questions tell whether a long-context model uses its context:
#
# * **Perplexity by position.** Split each evaluation sequence into position buckets and average the loss within
#   each. A model that uses its context predicts later tokens better than earlier ones, so the curve falls; a
#   model that has lost track past its training length shows the curve turn *up* there.
# * **RULER by length.** Synthetic tasks with known answers (notebook 19) at a ladder of lengths; one exact-match
#   score per task and length, shown as a table and a heatmap. The xGen-small claim is a flat row from 4K to
#   128K. Notebook 19's tasks teach; RULER's own thirteen, by its specification (notebook 32), give numbers that sit
#   beside published tables, and the last section runs them through this evaluator and through
#   lm-evaluation-harness, which agree sample by sample.

# %%
#| export
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from xgen_small import ruler
from xgen_small.data.loader import Loader, LoaderConfig, TokenStore
from xgen_small.generate import generate
from xgen_small.model import Decoder, model_with_params, params_of, token_logps
from xgen_small.tokenizer import Tokenizer


# %%
from pathlib import Path

import jax

# %% [markdown]
# A model's `max_seq_len` is a guard, not a table: RoPE angles are computed from positions on the fly, so
# evaluating a model *beyond* the length it was trained for (the point of the comparisons below) only needs the
# guard moved. `with_max_seq_len` does that and nothing else.

# %%
#| export
def with_max_seq_len(model: Decoder, length: int) -> Decoder:
    "The same weights, accepting sequences of up to `length` tokens."
    return model_with_params(model.cfg.replace(max_seq_len=length), params_of(model))

# %% [markdown]
# ## Perplexity by position
#
# Rows come from a token store through the loader in `boundary` mode with long rows, so that positions inside a
# row are positions inside *one* document wherever the document is long enough; losses are summed per position
# bucket over tokens that have a target.

# %%
#| export
@nnx.jit
def _token_nll(model, inputs, targets, positions, segment_ids):
    return -token_logps(model(inputs, positions, segment_ids), targets)

def perplexity_by_position(model: Decoder, store: TokenStore, seq_len: int, *, rows: int = 8, buckets: int = 8,
                           batch: int = 2, seed: int = 0) -> list[dict]:
    "Mean loss and perplexity of `model` in `buckets` equal position ranges of `rows` rows of `seq_len` tokens from "
    "`store`."
    if seq_len % buckets: raise ValueError(f"seq_len {seq_len} must divide into {buckets} buckets")
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    loader = Loader(store, LoaderConfig(seq_len, batch, split='boundary', seed=seed), vocab_size=model.cfg.vocab_size)
    total, count = np.zeros(seq_len), np.zeros(seq_len)
    for _ in range(-(-rows // batch)):
        b = next(loader)
        same_doc = b['positions'] == np.arange(seq_len)            # the row's first document, from its first token on
        nll = np.asarray(
            _token_nll(model, *(jnp.asarray(b[k]) for k in ('inputs', 'targets', 'positions', 'segment_ids')))
        )
        m = b['loss_mask'] * same_doc
        total += (nll * m).sum(0); count += m.sum(0)
    w = seq_len // buckets
    out = []
    for i in range(buckets):
        n = count[i * w:(i + 1) * w].sum()
        loss = float(total[i * w:(i + 1) * w].sum() / n) if n else float('nan')
        out.append(
            dict(start=i * w, end=(i + 1) * w, tokens=int(n), loss=loss, ppl=float(np.exp(loss)) if n else float('nan'))
        )
    return out

# %% [markdown]
# ## RULER by length
#
# `evaluate_ruler` generates the suite (deterministic for a seed), decodes greedily with the KV-cache generator in
# batches of equal-length prompts, and scores each answer. The result is a list of rows, one per task and length;
# `ruler_table` prints them as a Markdown table and `ruler_heatmap` draws them. With `keep_outputs=True` each row
# also keeps every sample's output, score and needle depths, and `ruler_by_depth` / `depth_table` split the score
# by where the needle sat: the classic needle-in-a-haystack view, which tells a model that cannot retrieve at all
# from one that retrieves only what is close to the question.

# %%
#| export
def evaluate_ruler(
    model: Decoder,
    tok: Tokenizer,
    tasks=ruler.TASKS,
    lengths=(256, 512),
    *,
    n: int = 10,
    seed: int = 0,
    cfg: ruler.RulerConfig = ruler.RulerConfig(),
    texts=None,
    batch: int = 8,
    keep_outputs: bool = False,
) -> list[dict]:
    "Exact-match and recall of `model` on `n` samples of every task at every length."
    too_long = [L for L in lengths if L > model.cfg.max_seq_len]
    if too_long: raise ValueError(f"lengths {too_long} exceed the model's max_seq_len {model.cfg.max_seq_len}")
    rows = []
    for task in tasks:
        for L in lengths:
            samples = [ruler.make_sample(tok, task, L, seed + i, cfg, texts) for i in range(n)]
            outs = [None] * n
            # batches of equal answer budgets: a sample's prompt plus its own budget is exactly L, and budgets differ
            # within a task (variable-tracking names tokenise to different lengths)
            groups = {}
            for j in range(n): groups.setdefault(samples[j].max_new_tokens, []).append(j)
            for budget, members in groups.items():
                for i in range(0, len(members), batch):
                    idx = members[i:i + batch]
                    gen = generate(model, [samples[j].input_ids for j in idx], max_new_tokens=budget,
                                   stop_tokens=[tok.eos_id], pad_id=tok.pad_id or 0).tokens
                    for j, o in zip(idx, gen): outs[j] = o
            texts_out = [tok.decode(o) for o in outs]
            scores = [ruler.score(s, t) for s, t in zip(samples, texts_out)]
            row = dict(task=task, length=L, n=n, exact=float(np.mean([s['exact'] for s in scores])),
                       recall=float(np.mean([s['recall'] for s in scores])))
            if keep_outputs:
                row['outputs'] = [
                    dict(answers=list(s.answers), output=t, exact=sc['exact'], depths=list(s.depths))
                    for s, t, sc in zip(samples, texts_out, scores)
                ]
            rows.append(row)
    return rows

def ruler_table(rows: list[dict], metric: str = 'exact', title: str = 'task', mean: bool = True) -> str:
    """A Markdown table, tasks down and lengths across, of `metric` in percent, with the mean over tasks last (if
    `mean`)."""
    tasks = list(dict.fromkeys(r['task'] for r in rows)); lengths = sorted({r['length'] for r in rows})
    cell = {(r['task'], r['length']): r[metric] for r in rows}
    fmt = lambda L: f'{L // 1024}K' if L % 1024 == 0 else str(L)
    lines = [f'| {title} | ' + ' | '.join(fmt(L) for L in lengths) + ' |', '|---|' + '---:|' * len(lengths)]
    for t in tasks:
        lines.append(
            f'| {t} | ' + ' | '.join(f'{100 * cell[t, L]:.0f}' if (t, L) in cell else '' for L in lengths) + ' |'
        )
    if mean and len(tasks) > 1:
        lines.append(
            '| **mean** | '
            + ' | '.join(f'{100 * np.mean([cell[t, L] for t in tasks if (t, L) in cell]):.0f}' for L in lengths)
            + ' |'
        )
    return '\n'.join(lines)

def ruler_by_depth(rows: list[dict], bins: int = 4) -> list[dict]:
    """Exact match by needle depth, from rows of `evaluate_ruler(..., keep_outputs=True)`: each row's samples split
    into `bins` equal ranges of the depth of their earliest needle (0 = the start of the prompt, the farthest from the
    question). Tasks without needles (`cwe`, `fwe`) have no depth and are left out."""
    out = []
    for r in rows:
        if 'outputs' not in r: raise ValueError("ruler_by_depth needs rows from evaluate_ruler(..., keep_outputs=True)")
        placed = [(min(o['depths']), o['exact']) for o in r['outputs'] if o['depths']]
        for b in range(bins):
            got = [e for d, e in placed if min(int(d * bins), bins - 1) == b]
            out.append(dict(task=r['task'], length=r['length'], depth=(b / bins, (b + 1) / bins), n=len(got),
                            exact=float(np.mean(got)) if got else float('nan')))
    return out

def depth_table(depth_rows: list[dict], title: str = 'needle depth') -> str:
    "A Markdown table of `ruler_by_depth` rows: task and length down, depth ranges across, exact match % (samples)."
    keys = list(dict.fromkeys((r['task'], r['length']) for r in depth_rows))
    bins = list(dict.fromkeys(r['depth'] for r in depth_rows))
    cell = {(r['task'], r['length'], r['depth']): r for r in depth_rows}
    lines = [
        f'| {title} | ' + ' | '.join(f'{100 * lo:.0f}-{100 * hi:.0f}%' for lo, hi in bins) + ' |',
        '|---|' + '---:|' * len(bins),
    ]
    for t, L in keys:
        cs = [cell[t, L, b] for b in bins]
        lines.append(
            f'| {t} @ {L} | ' + ' | '.join(f"{100 * c['exact']:.0f} ({c['n']})" if c['n'] else '' for c in cs) + ' |'
        )
    return '\n'.join(lines)

def ruler_heatmap(rows: list[dict], metric: str = 'exact', ax=None, title: str = 'RULER exact match (%)'):
    "A task x length heatmap of `metric` (percent); returns the matplotlib axes."
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r['task'] for r in rows)); lengths = sorted({r['length'] for r in rows})
    grid = np.full((len(tasks), len(lengths)), np.nan)
    for r in rows: grid[tasks.index(r['task']), lengths.index(r['length'])] = 100 * r[metric]
    ax = ax or plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.45 * len(tasks) + 1.2))[1]
    ax.imshow(grid, cmap='RdYlGn', vmin=0, vmax=100, aspect='auto')
    ax.set_xticks(range(len(lengths)), [f'{L // 1024}K' if L % 1024 == 0 else str(L) for L in lengths])
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]): ax.text(j, i, f'{grid[i, j]:.0f}', ha='center', va='center', fontsize=8)
    ax.set(xlabel='context length (tokens)', title=title)
    return ax

# %% [markdown]
# ## On a small trained model
#
# A quick run to exercise everything: the tiny preset trained for a few dozen steps on the sample corpus. Its
# scores are near zero (a minute of CPU training cannot teach retrieval; notebook 20 shows a model that can), but
# the shapes of the results, the perplexity curve and the plumbing are the real thing.

# %%
import tempfile
from xgen_small.checkpoint import load_run
from xgen_small.config import get_preset
from xgen_small.data.sample import load_sample
from xgen_small.schedules import LRPhase
from xgen_small.sharding import MeshConfig
from xgen_small.tokenizer import train_tokenizer
from xgen_small.train import TrainConfig, train
from xgen_small.extend import write_store

tmp = Path(tempfile.mkdtemp())
docs = load_sample()
tok = Tokenizer(train_tokenizer([d['text'] for d in docs[:600]], 4096))
store = write_store([dict(text=d['text'], domain=d['domain']) for d in docs[:800]], tok, tmp / 'store')
cfg = TrainConfig(model=get_preset('tiny', max_seq_len=1024), seq_len=256, batch_size=8, mesh=MeshConfig(fsdp=1, data=-1),
                  schedule=(LRPhase('broad', 60, 3e-3, 10, 'cosine', 3e-4),), save_every=60)
res = train(cfg, store, tmp / 'run', progress=False)
mean = lambda hs: sum(h['loss'] for h in hs) / len(hs)
print(f"trained {len(res.history)} steps: mean loss of the first 10 steps {mean(res.history[:10]):.2f}, of the last 10 {mean(res.history[-10:]):.2f}")

# %%
model, saved = load_run(tmp / 'run')
print(type(model).__name__, saved['train']['seq_len'], saved['model']['rope_theta'])
pp = perplexity_by_position(model, store, 1024, rows=8, buckets=8)
for r in pp: print(f"positions {r['start']:>4}-{r['end']:<4} {r['tokens']:>6} tokens  loss {r['loss']:.3f}  ppl {r['ppl']:8.1f}")

# %% [markdown]
# After one minute of training the curve is mostly noise around a high loss: this model has learned little
# beyond unigram statistics, so more context barely helps, at any position. The measurement is what matters
# here: on a model that uses its context the curve falls, and past a model's training length it turns up; that
# rise is what length extension (notebook 20) is meant to remove.

# %%
rows = evaluate_ruler(model, tok, ('niah_single', 'niah_multikey', 'vt'), (256, 512), n=4, cfg=ruler.RulerConfig(digits=5))
print(ruler_table(rows))
import matplotlib.pyplot as plt
ruler_heatmap(rows); plt.show()

# %%
from fastcore.test import test_eq, test_close, test_fail
test_eq(len(pp), 8); test_eq(pp[0]['start'], 0); test_eq(pp[-1]['end'], 1024)
assert all(r['tokens'] > 0 for r in pp)
assert all(0 < r['loss'] < np.log(tok.vocab_size) for r in pp)   # finite, and better than uniform
assert mean(res.history[-10:]) < mean(res.history[:10])
# load_run returns exactly the trained parameters
p_saved = params_of(model); p_run = jax.device_get(res.state['params'])
test_eq(jax.tree.structure(p_saved), jax.tree.structure(p_run))
assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p_saved), jax.tree.leaves(p_run)))
test_eq([(r['task'], r['length']) for r in rows], [(t, L) for t in ('niah_single', 'niah_multikey', 'vt') for L in (256, 512)])
assert all(0 <= r['exact'] <= r['recall'] <= 1 for r in rows)
test_eq(evaluate_ruler(model, tok, ('niah_single',), (256,), n=4, cfg=ruler.RulerConfig(digits=5)), rows[:1])   # deterministic
# a model that echoes the answer scores 100: the scorer and the generator agree on what an answer is
table = ruler_table([dict(task='a', length=1024, exact=1.0, recall=1.0), dict(task='b', length=1024, exact=0.5, recall=0.75)])
assert '| a | 100 |' in table and '| **mean** | 75 |' in table, table
assert '**mean**' not in ruler_table([dict(task='a', length=1024, exact=1.0), dict(task='b', length=1024, exact=0.5)], mean=False)
test_fail(lambda: evaluate_ruler(model, tok, ('niah_single',), (4096,)), contains='max_seq_len')
kept = evaluate_ruler(model, tok, ('niah_single', 'vt'), (256,), n=4, cfg=ruler.RulerConfig(digits=5), keep_outputs=True)
by_depth = ruler_by_depth(kept)
test_eq([sum(r['n'] for r in by_depth if r['task'] == t) for t in ('niah_single', 'vt')], [4, 4])   # each sample in one bin
test_eq(kept[0]['exact'], np.mean([o['exact'] for o in kept[0]['outputs']]))
fake = [dict(task='t', length=1024, outputs=[dict(depths=[d], exact=e) for d, e in ((0.1, 0.0), (0.2, 0.0), (0.6, 1.0), (1.0, 1.0))]
                                            + [dict(depths=[], exact=1.0)])]                   # a sample without needles
test_eq([(r['n'], r['exact']) for r in ruler_by_depth(fake, bins=2)], [(2, 0.0), (2, 1.0)])  # depth 1.0 falls in the last bin
assert '| t @ 1024 | 0 (2) | 100 (2) |' in depth_table(ruler_by_depth(fake, bins=2))
test_fail(lambda: ruler_by_depth(rows), contains='keep_outputs')
test_fail(lambda: perplexity_by_position(model, store, 1000, buckets=3), contains='buckets')
test_fail(lambda: load_run(tmp / 'nowhere'), contains='no checkpoints')
longer = with_max_seq_len(model, 2048)
test_eq(longer.cfg.max_seq_len, 2048)
x = jnp.asarray(np.arange(64)[None] % 4000)
test_eq(np.asarray(longer(x)), np.asarray(model(x)))

# %% [markdown]
# ## Long prompts on a CPU
#
# The paper's headline evaluation is RULER at 32K to 128K tokens. Prompts that long go through the generator's chunked
# prefill (notebook 15): 1,024 tokens at a time against the cache, in `[512, 512]` tiles of scores, so memory grows
# linearly with the prompt (0.09 GiB at 32K tokens for the tiny model), and even this CPU evaluates them. The small model above (its length guard moved; it was trained at 256 tokens, so it scores
# nothing) on one needle sample at 16K and one at 32K tokens:

# %%
import time
t0 = time.perf_counter()
long_rows = evaluate_ruler(with_max_seq_len(model, 32768), tok, ('niah_single',), (16384, 32768), n=1,
                           cfg=ruler.RulerConfig(digits=5), keep_outputs=True)
print(f'{time.perf_counter() - t0:.0f}s for a 16K-token and a 32K-token prompt')
for r in long_rows: print(r['length'], 'tokens; the model answered', repr(r['outputs'][0]['output'][:40]))

# %%
test_eq([r['length'] for r in long_rows], [16384, 32768])
assert all(len(r['outputs']) == 1 for r in long_rows)

# %% [markdown]
# ## RULER as published, here and through lm-evaluation-harness
#
# Notebook 32 builds RULER's tasks by RULER's specification; `evaluate_published` scores a model on them with the
# same greedy KV-cache generation as above. The same samples, written as harness tasks (`write_harness_tasks`),
# also run through EleutherAI's lm-evaluation-harness with our model as its `xgen_small` backend (notebook 31):
# the harness builds each request from the task file (the prompt, then the answer prefix as its `gen_prefix`),
# batches and generates by its own rules, and scores with RULER's metric. Both paths must give the same
# continuation for every sample, so the same score, which makes a published number reproducible either way.
#
# The small model above, its guard moved to 2,048 tokens, on all eleven synthetic tasks (the corpus's clean prose
# stands in for Paul Graham's essays; the QA tasks need the user's SQuAD and HotpotQA files). It was trained at 256
# tokens for a minute and scores nothing; what is measured here is agreement.

# %%
import contextlib, io, logging
import datasets
import lm_eval
from lm_eval.tasks import TaskManager
from xgen_small import ruler_published as rp
from xgen_small.harness import XGenSmallLM
essays = rp.load_essays([d['text'] for d in docs if d['domain'] == 'prose' and d['meta']['label'] == 'clean'
                         and d['meta']['dup_group'] is None])
m2k = with_max_seq_len(model, 2048)
t0 = time.perf_counter()
ours = rp.evaluate_published(m2k, tok, rp.SYNTHETIC, (2048,), n=2, essays=essays, batch=2, keep_outputs=True)
t_ours = time.perf_counter() - t0
names = rp.write_harness_tasks([s for t in rp.SYNTHETIC for s in rp.generate_samples(tok, t, 2048, 2, essays=essays)],
                               tmp / 'ruler_tasks')
logging.getLogger('lm_eval').setLevel(logging.ERROR); datasets.disable_progress_bars()
t0 = time.perf_counter()
with contextlib.redirect_stderr(io.StringIO()):                           # the harness' progress bars
    harness = lm_eval.simple_evaluate(model=XGenSmallLM(model=m2k, tok=tok, batch_size=2), tasks=names,
                                      task_manager=TaskManager(include_path=str(tmp / 'ruler_tasks')), log_samples=True)
t_harness = time.perf_counter() - t0
print(f'ours {t_ours:.0f}s, the harness {t_harness:.0f}s')
print('| task | ours | harness | same continuations |\n|---|---|---|---|')
same = {}
for r, name in zip(ours, names):
    theirs = [s['filtered_resps'][0] for s in sorted(harness['samples'][name], key=lambda s: s['doc_id'])]
    same[name] = [o['prediction'] for o in r['outputs']] == theirs
    print(f"| {r['task']} | {r['score']:.1f} | {harness['results'][name]['score,none']:.1f} | {same[name]} |")
print('the model continued niah_single_1 with', repr(ours[0]['outputs'][0]['prediction'][:60]))

# %%
test_eq(names, [f'ruler_{t}_2048' for t in rp.SYNTHETIC])
test_eq(all(same.values()), True)                                          # every continuation identical
for r, name in zip(ours, names): test_close(r['score'], harness['results'][name]['score,none'], eps=1e-9)
prompts = [s['arguments'][0][0] for s in sorted(harness['samples'][names[0]], key=lambda s: s['doc_id'])]
test_eq(prompts, [s.input + s.answer_prefix for s in rp.generate_samples(tok, rp.SYNTHETIC[0], 2048, 2)])   # the same prompts

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
