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
# # Command line
#
# > The `xgen-small` command line: `run`, `demo`, `presets` and one subcommand per stage.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/41_cli.ipynb)

# %%
#| default_exp cli

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
                    'lm_eval==0.4.13', 'accelerate==1.15.0',
                    'xgen_small @ git+https://github.com/xgen-small/xgen_small'], check=True)

# %%
#| export
from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np
from flax import nnx

from xgen_small.config import PRESETS, ConfigError, get_preset, num_params
from xgen_small.generate import Sampling, generate
from xgen_small.model import Decoder, params_of

# %%
from fastcore.test import test_eq, test_fail


# %% [markdown]
# `xgen-small run` is the main job: the whole pipeline of notebook 40, its stages taken from the pipeline's table.
# Every stage also has a subcommand of its own, for running one stage on your own data or checkpoints, and `demo`
# initialises a model from a preset and decodes a batch with the KV-cache generator, reporting compile time and
# decode speed (a quick check that an install and its accelerator work).
#
# `xgen-small curate IN... --out DIR` runs notebook 06's pipeline over JSONL(.gz) shards, and
# `xgen-small pretrain --data STORE --out RUN [--config cfg.json] [--set model.d_model=256 ...]` notebook 18's
# training loop (resuming when `RUN` already holds checkpoints).
# `xgen-small extend --run RUN --tokenizer TOK --out EXT [--recipe cpu|xgen|recipe.json]` runs notebook 20's
# stages from a pre-trained run, and `xgen-small eval --run RUN --tokenizer TOK [--lengths 512,1024 --tasks ...]`
# prints notebook 30's task x length table (and writes JSON, Markdown and a heatmap with `--out`).
# `xgen-small sft|dpo|rl --init RUN|PRESET --tokenizer TOK --out DIR [--config cfg.json] [--data JSONL...]` runs one
# post-training stage (notebooks 23-25) through the same training loop, and
# `xgen-small chat --run RUN --tokenizer TOK --message "..."` replies with a trained model.
#
# `eval` and `chat` also take a released checkpoint directly: `--hf DIR` loads a Llama-format checkpoint
# (`config.json` and safetensors, notebook 16) with its own tokenizer (`tokenizer.json`) and chat template
# (`tokenizer_config.json`), notebook 07's `HFTokenizer`. `xgen-small lm-eval --model xgen_small --model_args path=DIR
# --tasks ...` runs EleutherAI's lm-evaluation-harness on our model (notebook 31).
#
# Config fields are overridden from the command line with `--set field=value` (dotted for nested fields), read as
# the type of the value they replace, so a typo or a bad value fails with the field's name: it is
# `Config.with_overrides` from notebook 00, the same for every config.

# %%
get_preset('tiny').with_overrides(['d_model=256', 'scan_layers=false', 'rope_theta=1e6', 'remat=full'])

# %%
test_eq(get_preset('tiny').with_overrides(['n_layers=2', 'tie_embeddings=true']).n_layers, 2)
test_fail(lambda: get_preset('tiny').with_overrides(['width=3']), contains="no config field 'width'")
test_fail(lambda: get_preset('tiny').with_overrides(['n_layers=two']), contains='n_layers')
test_fail(lambda: get_preset('tiny').with_overrides(['n_layers']), contains='field=value')


# %%
#| export
def demo(preset: str = 'tiny', overrides: list[str] = (), batch: int = 4, prompt_len: int = 16,
         max_new_tokens: int = 32, sampling: Sampling = Sampling(), seed: int = 0) -> dict:
    "Initialise a model from `preset`, decode a batch of random prompts, print and return what happened."
    cfg = get_preset(preset).with_overrides(list(overrides))
    print(f'devices: {jax.devices()}')
    print(f'model: {preset} ({num_params(cfg):,} parameters), {cfg.n_layers} layers x d_model {cfg.d_model}, '
          f'{cfg.n_heads} heads / {cfg.n_kv_heads} KV heads, computing in {cfg.compute_jnp_dtype.name}')
    t0 = time.perf_counter()
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    prompts = [
        rng.integers(0, cfg.vocab_size, size=int(rng.integers(1, prompt_len + 1))).tolist() for _ in range(batch)
    ]
    generate(model, prompts, max_new_tokens, sampling=sampling, seed=seed)     # compiles
    t1 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens, sampling=sampling, seed=seed)
    t2 = time.perf_counter()
    n_new = sum(map(len, out.tokens))
    for p, t in zip(prompts, out.tokens):
        print(f'prompt ({len(p):2d} tokens) -> {t[:12]}{" ..." if len(t) > 12 else ""}')
    print(
        f'init + compile {t1 - t0:.1f}s; decoded {n_new} tokens in {t2 - t1:.3f}s = {n_new / (t2 - t1):,.0f} tokens/s'
    )
    return dict(prompts=prompts, tokens=out.tokens, tokens_per_s=n_new / (t2 - t1))


# %%
r = demo(batch=2, max_new_tokens=8)

# %%
test_eq([len(t) for t in r['tokens']], [8, 8])
test_eq(r['tokens'], demo(batch=2, max_new_tokens=8)['tokens'])  # deterministic for a seed


# %% [markdown]
# ## The entry point

# %%
#| export
def _model_source(p, run_help: str) -> None:
    "`--run RUN --tokenizer TOK` (our checkpoints) or `--hf DIR` (a Llama-format checkpoint with its tokenizer)."
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--run', help=run_help)
    src.add_argument('--hf', metavar='DIR', help='a Hugging Face checkpoint: config.json, safetensors, tokenizer.json '
                     'and tokenizer_config.json (its chat template)')
    p.add_argument('--tokenizer', help="a sentencepiece model, or a directory with tokenizer.json (with --hf: the "
                   "checkpoint's own, by default)")

def _load_model_and_tokenizer(args):
    "The model and tokenizer that `_model_source`'s arguments name; a clear error when the tokenizer is missing."
    from xgen_small.checkpoint import load_run
    from xgen_small.hf import load_hf_checkpoint
    from xgen_small.tokenizer import load_tokenizer
    if args.hf:
        model = load_hf_checkpoint(args.hf)
        tok = load_tokenizer(args.tokenizer or args.hf)
    else:
        if not args.tokenizer: raise ValueError("--run needs --tokenizer (the model the run was trained with)")
        model, _ = load_run(args.run)
        tok = load_tokenizer(args.tokenizer)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer's vocabulary ({tok.vocab_size}) is larger than the model's "
                         f"({model.cfg.vocab_size}): not the tokenizer this model was trained with")
    return model, tok

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='xgen-small', description='xGen-small pipeline: curate, train, extend, post-train, evaluate.'
    )
    sub = p.add_subparsers(dest='command', required=True)
    d = sub.add_parser('demo', help='initialise a model from a preset and decode a batch with the KV cache')
    d.add_argument('--preset', default='tiny', choices=sorted(PRESETS))
    d.add_argument(
        '--set',
        dest='overrides',
        action='append',
        default=[],
        metavar='FIELD=VALUE',
        help='override a ModelConfig field',
    )
    d.add_argument('--batch', type=int, default=4)
    d.add_argument('--prompt-len', type=int, default=16)
    d.add_argument('--max-new-tokens', type=int, default=32)
    d.add_argument('--temperature', type=float, default=0.0)
    d.add_argument('--top-k', type=int, default=0)
    d.add_argument('--top-p', type=float, default=1.0)
    d.add_argument('--seed', type=int, default=0)
    sub.add_parser('presets', help='list the model presets and their parameter counts')
    # the run's stages come from the pipeline's table
    from xgen_small.pipeline import STAGE_TABLE, STAGES
    r = sub.add_parser(
        'run', help=f"the whole pipeline: {', '.join(STAGES)} (notebook 40); resumes the run in --out",
        epilog='stages: ' + '; '.join(f'{s.name}: {s.about}' for s in STAGE_TABLE),
    )
    r.add_argument(
        '--preset',
        default='cpu',
        choices=('cpu', 'xgen_4b', 'xgen_9b'),
        help='pipeline preset (default: cpu, the tiny model)',
    )
    r.add_argument(
        '--config',
        default=None,
        help='PipelineConfig JSON file (instead of --preset; a run writes its own as pipeline.json)',
    )
    r.add_argument('--set', dest='overrides', action='append', default=[], metavar='FIELD=VALUE',
                   help='override a field, e.g. pretrain.batch_size=16, rl.steps=40, eval.lengths=512,1024')
    r.add_argument(
        '--inputs',
        nargs='+',
        default=None,
        metavar='JSONL',
        help='shards to curate (default: the embedded sample corpus)',
    )
    r.add_argument(
        '--out', default='runs/xgen_small', help='run directory (default: runs/xgen_small); an existing run is resumed'
    )
    r.add_argument('--steps-scale', type=float, default=1.0, help="multiply every training stage's steps (quick runs)")
    r.add_argument('--stop-after', default=None, choices=STAGES, metavar='STAGE', help='stop after this stage')
    r.add_argument('--redo', default=None, choices=STAGES, metavar='STAGE',
                   help='discard this stage and every later one, then run them again')
    r.add_argument('--status', action='store_true', help="print each stage's state and exit")
    r.add_argument('--dry-run', action='store_true', help='print the training plan and the mesh on this host, and exit')
    r.add_argument('--no-progress', action='store_true')
    c = sub.add_parser(
        'curate', help='filter, score, deduplicate and mix JSONL(.gz) shards; writes kept documents and a ledger'
    )
    c.add_argument('inputs', nargs='+', metavar='IN', help='JSONL or JSONL.gz shards (one JSON object per line)')
    c.add_argument('--out', required=True, help='output directory')
    c.add_argument('--workers', type=int, default=2,
                   help='processes for the stages (with --executor ray and no --address: local Ray CPUs)')
    c.add_argument('--executor', choices=('local', 'ray'), default='local',
                   help="who runs the stages' jobs: processes here, or Ray tasks (notebook 06)")
    c.add_argument('--partitions', type=int, default=None,
                   help='hash partitions of the dedup stage (default: one per input shard)')
    c.add_argument('--address', default=None,
                   help="--executor ray: an existing cluster ('auto' on a cluster node, 'ray://head:10001')")
    c.add_argument('--quality-model', default='default',
                   help="saved quality model (.npz), 'default' (train on the sample corpus) or 'none'")
    c.add_argument('--default-domain', default=None, help='domain for documents without one (else they are dropped)')
    c.add_argument('--dedup-threshold', type=float, default=0.6)
    c.add_argument(
        '--total-tokens', type=float, default=None, help='mixture budget across phases (default: the kept corpus size)'
    )
    c.add_argument('--no-progress', action='store_true')
    t = sub.add_parser(
        'pretrain', help='pre-train from a token store (notebook 08) with a TrainConfig JSON file and overrides'
    )
    t.add_argument('--data', required=True, help='token store directory')
    t.add_argument('--out', required=True, help='run directory (checkpoints, history); an existing run is resumed')
    t.add_argument('--config', default=None, help='TrainConfig JSON (default: the tiny preset defaults)')
    t.add_argument('--set', dest='overrides', action='append', default=[], metavar='FIELD=VALUE',
                   help="override a TrainConfig field, e.g. model.d_model=256, batch_size=16, schedule.0.peak_lr=1e-3")
    t.add_argument(
        '--steps', type=int, default=None, help='stop after this many steps in total (default: the schedule length)'
    )
    t.add_argument('--no-progress', action='store_true')
    e = sub.add_parser(
        'extend', help='two-stage length extension plus over-length training of a pre-trained run (notebook 20)'
    )
    e.add_argument('--run', required=True, help='pre-training run directory (its latest checkpoint is extended)')
    e.add_argument('--tokenizer', required=True, help='the sentencepiece model the run was trained with')
    e.add_argument(
        '--out', required=True, help='extension directory (one sub-directory per stage); resumed when it exists'
    )
    e.add_argument('--recipe', default='cpu', help="'cpu', 'xgen' or a recipe JSON file (ExtensionRecipe.to_dict)")
    e.add_argument(
        '--docs',
        nargs='*',
        default=None,
        metavar='JSONL',
        help='natural documents for the long mixture (default: the sample corpus)',
    )
    e.add_argument('--steps-scale', type=float, default=1.0, help='multiply every stage\'s steps (quick runs)')
    e.add_argument('--no-progress', action='store_true')
    v = sub.add_parser(
        'eval', help='RULER-style tasks by length, and perplexity by position, of a trained run (notebook 30)'
    )
    _model_source(v, 'run directory (pre-training, or one stage of an extension)')
    v.add_argument('--suite', choices=('teaching', 'published'), default='teaching',
                   help="notebook 19's tasks, or RULER's own by its specification (notebook 32)")
    v.add_argument(
        '--tasks', default=None, help="comma-separated tasks (default: the suite's, as far as the inputs allow)"
    )
    v.add_argument('--essays', default=None, help="published: the essay haystack (RULER's PaulGrahamEssays.json, "
                   "a .txt file or a directory of them)")
    v.add_argument('--squad', default=None, help='published: the SQuAD v2 dev JSON, for qa_1')
    v.add_argument('--hotpotqa', default=None, help='published: the HotpotQA distractor dev JSON, for qa_2')
    v.add_argument('--templates', default=None,
                   help="published: RULER's scripts/data/synthetic/constants.py (or a JSON file) for its exact wording")
    v.add_argument('--harness-tasks', default=None, metavar='DIR',
                   help='published: also write the samples as lm-evaluation-harness tasks in DIR')
    v.add_argument('--lengths', default='512,1024,2048', help='comma-separated lengths in tokens')
    v.add_argument('--n', type=int, default=10, help='samples per task and length')
    v.add_argument('--digits', type=int, default=5, help='digits of each needle value')
    v.add_argument('--seed', type=int, default=0)
    v.add_argument(
        '--perplexity-store', default=None, help='token store for perplexity by position (at the longest length)'
    )
    v.add_argument('--out', default=None, help='directory for results.json, results.md and heatmap.png')
    h = sub.add_parser('lm-eval', add_help=False,
                       help="EleutherAI's lm-evaluation-harness with our model registered as 'xgen_small' "
                       "(notebook 31); every further argument is the harness' own")
    h.add_argument('harness_args', nargs=argparse.REMAINDER)
    c = sub.add_parser('chat', help="reply to messages with a trained run or a Hugging Face checkpoint's own template")
    _model_source(c, 'run directory of any stage')
    c.add_argument('--message', action='append', required=True, help='a user message (repeat for several prompts)')
    c.add_argument('--max-new-tokens', type=int, default=64)
    c.add_argument('--temperature', type=float, default=0.0, help='0 is greedy')
    for name, what, data_help in (
            ('sft', 'supervised fine-tuning on chat conversations, assistant tokens only (notebook 23)',
             "JSONL of {'messages': [...]} (default: the generated instruction set, --n conversations)"),
            ('dpo', 'preference learning (DPO / IPO) from prompt/chosen/rejected pairs (notebook 24)',
             "JSONL of {'prompt': [...], 'chosen': str, 'rejected': str} (default: --n rule-made arithmetic pairs)"),
            ('rl', 'online GRPO with verifiable rewards: math answers, code unit tests (notebook 25)',
             "JSONL of {'kind': 'math', 'prompt': [...], 'answer': str} or {'kind': 'code', ..., 'tests': [...]} "
             "(default: --n arithmetic training tasks)")):
        s = sub.add_parser(name, help=what)
        s.add_argument('--init', required=True, help="run directory to start from (any stage), or a model preset name "
                       "such as 'tiny' for a fresh random model sized to the tokenizer")
        s.add_argument('--tokenizer', required=True, help='the sentencepiece model')
        s.add_argument(
            '--config',
            default=None,
            help=f'{name.upper() if name != "rl" else "RL"}Config JSON file (default: its defaults)',
        )
        s.add_argument('--data', nargs='*', default=None, metavar='JSONL', help=data_help)
        s.add_argument('--n', type=int, default=1000, help='how many generated examples when --data is not given')
        s.add_argument('--out', required=True, help='run directory (checkpoints, history); an existing run is resumed')
        if name in ('dpo', 'rl'):
            s.add_argument('--ref', default=None, help='reference run directory (default: --init)')
        s.add_argument('--no-progress', action='store_true')
    return p

def _read_jsonl(paths, what: str) -> list[dict]:
    "Objects from JSONL(.gz) files, with the file and line of anything that is not one."
    import gzip
    import json
    out = []
    for p in paths:
        with (gzip.open(p, 'rt', encoding='utf-8') if str(p).endswith('.gz') else open(p, encoding='utf-8')) as f:
            for i, line in enumerate(f):
                if not line.strip(): continue
                try: r = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{p} line {i + 1}: not JSON ({err.msg})") from None
                if not isinstance(r, dict): raise ValueError(f"{p} line {i + 1}: expected a JSON object ({what})")
                out.append(r)
    return out

def _post_cmd(args) -> None:
    "`sft`, `dpo` and `rl`: load the start (and reference), the config and the data, run the stage, print a summary."
    from pathlib import Path

    from xgen_small.checkpoint import load_run
    from xgen_small.config import PRESETS, get_preset
    from xgen_small.posttrain import random_params
    from xgen_small.tokenizer import Tokenizer
    tok = Tokenizer(args.tokenizer)
    if args.init in PRESETS:
        mcfg = get_preset(args.init, vocab_size=tok.vocab_size); params = random_params(mcfg)
    else:
        model, _ = load_run(args.init); mcfg = model.cfg; params = params_of(model)
    if mcfg.vocab_size < tok.vocab_size:
        raise ValueError(
            f"the model's vocabulary ({mcfg.vocab_size}) is smaller than the tokenizer's ({tok.vocab_size})"
        )
    ref = None
    if getattr(args, 'ref', None):
        rm, _ = load_run(args.ref); ref = params_of(rm)
    data = _read_jsonl(args.data, args.command) if args.data else None
    kw = dict(progress=not args.no_progress)
    if args.command == 'sft':
        from xgen_small.sft import SFTConfig, sft
        from xgen_small.tasks import instruction_set
        cfg = SFTConfig.load(args.config) if args.config else SFTConfig()
        r = sft(params, mcfg, tok, data or instruction_set(args.n), cfg, args.out, **kw)
    elif args.command == 'dpo':
        from xgen_small.dpo import DPOConfig, arithmetic_pairs, dpo
        cfg = DPOConfig.load(args.config) if args.config else DPOConfig()
        r = dpo(params, mcfg, tok, data or arithmetic_pairs(args.n), cfg, args.out, ref_params=ref, **kw)
    else:
        from xgen_small.rl import RLConfig, rl
        from xgen_small.tasks import arithmetic_tasks
        cfg = RLConfig.load(args.config) if args.config else RLConfig()
        r = rl(params, mcfg, tok, data or arithmetic_tasks(args.n), cfg, args.out, ref_params=ref, **kw)
    h = r.history
    if not h: print(f'nothing to do: the run in {args.out} is already at its last step'); return
    extra = {'dpo': ('reward_accuracy', 'reward_margin'), 'rl': ('reward', 'accuracy')}.get(args.command, ())
    print(f"{args.command}: steps {h[0]['step']}-{h[-1]['step']}, loss {h[0]['loss']:.4f} -> {h[-1]['loss']:.4f}"
          + ''.join(f", {k} {h[0][k]:.3f} -> {h[-1][k]:.3f}" for k in extra) + f"; run in {Path(args.out)}")

def _read_docs(paths) -> list[dict]:
    "Documents (`text`, `domain`) from JSONL(.gz) files; the sample corpus when `paths` is empty."
    from xgen_small.data.sample import load_sample
    if not paths: return [dict(text=d['text'], domain=d['domain']) for d in load_sample()]
    docs = []
    for i, r in enumerate(_read_jsonl(paths, 'a document')):
        if not isinstance(r.get('text'), str):
            raise ValueError(f"document {i}: expected an object with a string 'text'")
        docs.append(dict(text=r['text'], domain=r.get('domain', 'web')))
    return docs

def _run_cmd(args) -> None:
    "`run`: build the pipeline config, then print its plan or status, or run it."
    from dataclasses import replace
    from pathlib import Path

    from xgen_small.pipeline import Pipeline, PipelineConfig, pipeline_config, plan, scale_steps
    from xgen_small.sharding import init_distributed
    init_distributed()
    if args.config: cfg = scale_steps(PipelineConfig.load(args.config), args.steps_scale)
    else: cfg = pipeline_config(args.preset, steps_scale=args.steps_scale)
    if args.inputs: cfg = replace(cfg, inputs=tuple(str(Path(p).absolute()) for p in args.inputs))
    cfg = cfg.with_overrides(args.overrides)
    p = Pipeline(cfg, args.out, progress=not args.no_progress)
    if args.dry_run: print(plan(cfg)); return
    if args.status:
        for stage, state in p.status().items(): print(f'{stage:>10}: {state}')
        return
    t0 = time.perf_counter()
    sums = p.run(stop_after=args.stop_after, redo=args.redo)
    print(f'pipeline: {len(sums)} stages in {time.perf_counter() - t0:.0f}s; run in {args.out}'
          + (f"; report in {Path(args.out) / 'report' / 'summary.md'}" if 'report' in sums else ''))

def _extend_cmd(args) -> None:
    import json
    from pathlib import Path

    from xgen_small.checkpoint import load_run
    from xgen_small.extend import EXTENSION_PRESETS, ExtensionRecipe, extend
    from xgen_small.tokenizer import Tokenizer
    from xgen_small.train import TrainConfig
    recipe = (EXTENSION_PRESETS[args.recipe] if args.recipe in EXTENSION_PRESETS else
              ExtensionRecipe.from_dict(json.loads(Path(args.recipe).read_text())))
    model, saved = load_run(args.run)
    cfg = TrainConfig.from_dict(saved['train'])
    params = params_of(model)
    r = extend(recipe, params, cfg, Tokenizer(args.tokenizer), _read_docs(args.docs), args.out,
               progress=not args.no_progress, steps_scale=args.steps_scale)
    for s in r.stages:
        print(
            f"{s['stage']:>10}: {s['seq_len']:>7,} tokens, RoPE base {s['rope_theta']:>12,.0f}, final loss "
            f"{s['loss']:.3f} ({s['seconds']}s)"
        )
    print(f"extended model: {args.out}/{recipe.stages[-1].name}")

def _eval_cmd(args) -> None:
    import json
    from pathlib import Path

    from xgen_small import ruler
    from xgen_small.data.loader import TokenStore
    from xgen_small.evaluate import evaluate_ruler, perplexity_by_position, ruler_heatmap, ruler_table, with_max_seq_len
    try: lengths = [int(x) for x in args.lengths.split(',') if x]
    except ValueError: raise ValueError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
    if args.suite == 'published': return _eval_published(args, lengths)
    given = [o for o in ('essays', 'squad', 'hotpotqa', 'templates', 'harness_tasks') if getattr(args, o)]
    if given: raise ValueError(f"--{given[0].replace('_', '-')} belongs to --suite published")
    tasks = [t for t in args.tasks.split(',') if t] if args.tasks else list(ruler.TASKS)
    bad = [t for t in tasks if t not in ruler.TASKS]
    if bad: raise ValueError(f"unknown task(s) {bad}; expected some of {list(ruler.TASKS)}")
    model, tok = _load_model_and_tokenizer(args)
    model = with_max_seq_len(model, max(lengths)) if max(lengths) > model.cfg.max_seq_len else model
    rows = evaluate_ruler(
        model, tok, tasks, lengths, n=args.n, seed=args.seed, cfg=ruler.RulerConfig(digits=args.digits)
    )
    print(ruler_table(rows))
    out = dict(ruler=rows)
    if args.perplexity_store:
        out['perplexity'] = perplexity_by_position(model, TokenStore.open(args.perplexity_store), max(lengths))
        for r in out['perplexity']: print(f"positions {r['start']:>6}-{r['end']:<6} loss {r['loss']:.3f}")
    if args.out:
        d = Path(args.out); d.mkdir(parents=True, exist_ok=True)
        (d / 'results.json').write_text(json.dumps(out, indent=1))
        (d / 'results.md').write_text(ruler_table(rows) + '\n')
        import matplotlib
        matplotlib.use('Agg')
        ax = ruler_heatmap(rows); ax.figure.tight_layout(); ax.figure.savefig(d / 'heatmap.png', dpi=100)
        print(f'results in {d}')

def _eval_published(args, lengths) -> None:
    "`eval --suite published`: RULER's tasks by its specification, scored here (and written for the harness)."
    import json
    from pathlib import Path

    from xgen_small import ruler_published as rp
    from xgen_small.evaluate import with_max_seq_len
    essays = rp.load_essays(args.essays) if args.essays else None
    qa = {k: read(getattr(args, k)) for k, read in (('squad', rp.read_squad), ('hotpotqa', rp.read_hotpotqa))
          if getattr(args, k)}
    templates = rp.load_templates(args.templates) if args.templates else None
    tasks = [t for t in args.tasks.split(',') if t] if args.tasks else list(rp.available_tasks(essays, qa))
    bad = [t for t in tasks if t not in rp.TASKS]
    if bad: raise ValueError(f"unknown task(s) {bad}; RULER's are {list(rp.TASKS)}")
    model, tok = _load_model_and_tokenizer(args)
    model = with_max_seq_len(model, max(lengths)) if max(lengths) > model.cfg.max_seq_len else model
    rows = rp.evaluate_published(model, tok, tasks, lengths, n=args.n, seed=args.seed, templates=templates,
                                 essays=essays, qa=qa)
    print(rp.score_table(rows))
    if args.harness_tasks:
        samples = [
            s
            for t in tasks
            for L in lengths
            for s in rp.generate_samples(
                tok,
                t,
                L,
                args.n,
                seed=args.seed,
                templates=templates,
                essays=essays,
                qa=qa.get(rp.TASKS[t][1].get('dataset')),
            )
        ]
        names = rp.write_harness_tasks(samples, args.harness_tasks)
        print(
            f"{len(names)} harness tasks in {args.harness_tasks}: xgen-small lm-eval "
            f"--include_path {args.harness_tasks} --tasks {','.join(names)} --model ..."
        )
    if args.out:
        d = Path(args.out); d.mkdir(parents=True, exist_ok=True)
        (d / 'results.json').write_text(json.dumps(dict(ruler_published=rows), indent=1))
        (d / 'results.md').write_text(rp.score_table(rows) + '\n')
        print(f'results in {d}')

def _lm_eval_cmd(args) -> None:
    "Run the harness' command line with `xgen_small` registered (its command line has no plugin discovery)."
    try:
        from lm_eval.__main__ import cli_evaluate

        import xgen_small.harness  # noqa: F401  (registers the model)
    except ImportError as e:
        raise ValueError(f"lm-eval needs the harness: pip install lm_eval==0.4.13 accelerate ({e})") from None
    argv, sys.argv = sys.argv, ['lm-eval', *args.harness_args]
    try: cli_evaluate()
    finally: sys.argv = argv

def _chat_cmd(args) -> None:
    from xgen_small.posttrain import chat
    model, tok = _load_model_and_tokenizer(args)
    sampling = Sampling(temperature=args.temperature) if args.temperature > 0 else Sampling()
    for q, reply in zip(args.message, chat(model, tok, args.message, args.max_new_tokens, sampling=sampling)):
        print(f'> {q}\n{reply}')

def _demo_cmd(args) -> None:
    demo(args.preset, args.overrides, args.batch, args.prompt_len, args.max_new_tokens,
         Sampling(args.temperature, args.top_k, args.top_p), args.seed)

def _presets_cmd(args) -> None:
    for name, c in PRESETS.items(): print(f'{name:8} {num_params(c):>15,} parameters  {c}')

def _curate_cmd(args) -> None:
    from xgen_small.data.curate import CurateConfig, curate, make_executor
    cfg = CurateConfig(workers=args.workers, default_domain=args.default_domain,
                       dedup_threshold=args.dedup_threshold, total_tokens=args.total_tokens, partitions=args.partitions)
    qm = None if args.quality_model == 'none' else args.quality_model
    ex = make_executor(args.executor, workers=args.workers, address=args.address)
    s = curate(args.inputs, args.out, cfg, quality_model=qm, progress=not args.no_progress, executor=ex).summary
    print(f"{s['lines']:,} lines: {s['kept']:,} kept, {s['dropped']:,} dropped ({s['seconds']['total']}s); "
          f"kept/, ledger/ and summary.json in {args.out}")
    for reason, n in sorted(s['reasons'].items(), key=lambda kv: -kv[1]): print(f'  {n:6,}  {reason}')
    for e in s['inputs']:
        if e['error']: print(f"  shard {e['path']}: {e['error']}", file=sys.stderr)

def _pretrain_cmd(args) -> None:
    import json
    from pathlib import Path

    from xgen_small.train import TrainConfig, train
    cfg = (TrainConfig.load(args.config) if args.config else TrainConfig()).with_overrides(args.overrides)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / 'config.json').write_text(json.dumps(cfg.to_dict(), indent=1))
    r = train(cfg, args.data, args.out, steps=args.steps, progress=not args.no_progress)
    if r.history: print(f"trained to step {r.history[-1]['step']}: loss {r.history[-1]['loss']:.4f}; run in {args.out}")
    else: print(f'nothing to do: the run in {args.out} is already at its last step')

COMMANDS = dict(demo=_demo_cmd, presets=_presets_cmd, curate=_curate_cmd, pretrain=_pretrain_cmd, run=_run_cmd,
                extend=_extend_cmd, eval=_eval_cmd, chat=_chat_cmd, sft=_post_cmd, dpo=_post_cmd, rl=_post_cmd,
                **{'lm-eval': _lm_eval_cmd})

def main(argv: list[str] | None = None) -> int:
    """Run the `xgen-small` command line; returns the exit status: 0, 2 for a bad configuration or input (a message
    naming it), 3 when training diverged (the last good checkpoint is kept)."""
    from xgen_small.train import TrainingDiverged
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['lm-eval']:                 # every further argument is the harness' (argparse would read them)
        args = argparse.Namespace(command='lm-eval', harness_args=argv[1:])
    else: args = _parser().parse_args(argv)
    try: COMMANDS[args.command](args)
    except TrainingDiverged as e:
        print(f'xgen-small {args.command}: {e}', file=sys.stderr)
        return 3
    except (ConfigError, ValueError, FileNotFoundError) as e:          # PipelineError is a ValueError
        print(f'xgen-small {args.command}: error: {e}', file=sys.stderr)
        return 2
    return 0


# %%
test_eq(main(['demo', '--batch', '1', '--max-new-tokens', '4']), 0)
test_eq(main(['demo', '--set', 'n_heads=3']), 2)      # invalid config: a clear message and exit status 2

# %% [markdown]
# `xgen-small run` is the whole pipeline (notebook 40). `--dry-run` prints what it would train, and on what mesh,
# without touching any data; here the 9B preset on the devices this notebook sees:

# %%
test_eq(main(['run', '--preset', 'xgen_9b', '--dry-run']), 0)
test_eq(main(['run', '--set', 'eval.lengths=512,8192', '--dry-run']), 2)     # beyond the extended model's 4K tokens

# %% [markdown]
# A released checkpoint, in miniature: a Llama-format directory (`config.json`, safetensors) with a byte-level BPE
# `tokenizer.json` and Llama 3's chat template, all written here (a real one is downloaded the same shape). `--hf`
# loads weights, tokenizer and template together; the reply is a random model's, the prompt is exactly what
# `transformers` would render (`tests/test_cli.py` checks that):

# %%
import json, tempfile
from pathlib import Path
from tokenizers import Tokenizer as HFBackend, decoders, models, pre_tokenizers, trainers
from xgen_small.data.sample import load_sample
from xgen_small.hf import save_hf_checkpoint
ckpt = Path(tempfile.mkdtemp()) / 'llama3_style'; ckpt.mkdir()
bpe = HFBackend(models.BPE())
bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
bpe.train_from_iterator([d['text'] for d in load_sample()[:200]], trainers.BpeTrainer(
    vocab_size=600, special_tokens=['<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
bpe.save(str(ckpt / 'tokenizer.json'))
(ckpt / 'tokenizer_config.json').write_text(json.dumps(dict(
    bos_token='<|begin_of_text|>', eos_token='<|eot_id|>',
    chat_template="{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>"
                  "\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                  "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")))
save_hf_checkpoint(Decoder(get_preset('tiny', vocab_size=600, max_seq_len=512), rngs=nnx.Rngs(0)), ckpt)
test_eq(main(['chat', '--hf', str(ckpt), '--message', 'What is 6 * 7?', '--max-new-tokens', '8']), 0)
test_eq(main(['eval', '--hf', str(ckpt), '--tasks', 'niah_single', '--lengths', '256', '--n', '2']), 0)
test_eq(main(['eval', '--run', str(ckpt), '--tasks', 'niah_single']), 2)        # a run needs its --tokenizer

# %% [markdown]
# `--suite published` runs RULER's own tasks (notebook 32); `--essays`, `--squad` and `--hotpotqa` bring the files
# its essay and QA tasks need, `--templates` RULER's wording, and `--harness-tasks DIR` writes the same samples for
# the harness:

# %%
hdir = ckpt.parent / 'harness_tasks'
test_eq(main(['eval', '--hf', str(ckpt), '--suite', 'published', '--tasks', 'niah_single_1,vt', '--lengths', '2048',
              '--n', '1', '--harness-tasks', str(hdir), '--out', str(ckpt.parent / 'pub')]), 0)
test_eq(sorted(p.name for p in hdir.glob('*.yaml')), ['ruler_niah_single_1_2048.yaml', 'ruler_vt_2048.yaml'])
test_eq([r['task'] for r in json.loads((ckpt.parent / 'pub' / 'results.json').read_text())['ruler_published']], ['niah_single_1', 'vt'])
test_eq(main(['eval', '--hf', str(ckpt), '--suite', 'published', '--tasks', 'niah_single_2', '--lengths', '1024']), 2)   # needs --essays
test_eq(main(['eval', '--hf', str(ckpt), '--essays', 'x.json', '--lengths', '256']), 2)   # --essays is the published suite's

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
