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
# # lm-evaluation-harness
#
# > EleutherAI's lm-evaluation-harness on our JAX model: log-likelihoods, perplexity and KV-cache generation.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/31_harness.ipynb)

# %%
#| default_exp harness

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
# Our own evaluators (RULER in notebooks 19 and 30, the post-training checks) answer the questions this project asks.
# Numbers that can be compared with anyone else's come from the shared harness: EleutherAI's
# [lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness) defines GSM8K, MMLU, HumanEval,
# RULER and hundreds of other tasks once, with their prompts, few-shot splits and metrics, and asks a model for
# three things only:
#
# - `loglikelihood(context, continuation)`: the log-probability of the continuation after the context, and whether
#   greedy decoding would have produced it (multiple-choice tasks such as MMLU compare these across the choices);
# - `loglikelihood_rolling(text)`: the log-probability of a whole text, scored in windows of the model's context
#   (perplexity tasks);
# - `generate_until(context, until=...)`: a continuation, cut at the first of some stop strings (GSM8K, HumanEval,
#   RULER).
#
# `XGenSmallLM` answers them with the JAX model: batched scoring by one jitted forward pass per batch, and
# generation through the KV-cache generator of notebook 15 (long prompts prefilled blockwise). It loads a Hugging
# Face checkpoint directory (weights, `tokenizer.json` and chat template, notebooks 07 and 16) or one of our run
# directories with its tokenizer. Tokenization follows the harness' own rules (it subclasses `TemplateLM`, which
# splits context and continuation the way every harness model does), so a task sees the same tokens whichever
# backend runs it.

# %%
#| export
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  (the harness' own backends: registered before ours, as its CLI does)
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from xgen_small.generate import Sampling, generate
from xgen_small.model import Decoder, token_logps
from xgen_small.tokenizer import load_tokenizer, render_chat

# %%
import tempfile
from fastcore.test import test_eq, test_close, test_fail

# %% [markdown]
# ## The adapter
#
# Scoring pads every batch to a multiple of 64 tokens (so that a handful of compiled shapes serve a whole task) and
# marks the padding with segment id 0, which real tokens never attend to. Requests are sorted by length first, as
# the harness' own backends do, so that a batch wastes little padding, and the answers are put back in request
# order. A sequence longer than the model's context keeps its last `max_length` tokens, as in the harness.

# %%
#| export
def _load(path: str, tokenizer: str | None, dtype: str | None):
    "A Hugging Face checkpoint directory (config.json + safetensors) or one of our run directories, and its tokenizer."
    from xgen_small.checkpoint import load_run
    from xgen_small.hf import load_hf_checkpoint
    p = Path(path)
    over = {} if dtype is None else dict(compute_dtype=dtype)
    if (p / 'config.json').exists() and any(p.glob('*.safetensors')):
        return load_hf_checkpoint(p, **over), load_tokenizer(tokenizer or p)
    if tokenizer is None:
        raise ValueError(f"{p} is not a Hugging Face checkpoint; for a run directory pass tokenizer=PATH as well")
    from xgen_small.model import model_with_params, params_of
    model, _ = load_run(p)
    if over: model = model_with_params(model.cfg.replace(**over), params_of(model))
    return model, load_tokenizer(tokenizer)

@jax.jit
def _score(model: Decoder, tokens, targets, segment_ids):
    "Log-probability of each target and whether it is the argmax, for a right-padded batch."
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits = model(tokens, positions, segment_ids)
    return token_logps(logits, targets), jnp.argmax(logits, -1) == targets

@register_model('xgen_small', 'xgen-small')
class XGenSmallLM(TemplateLM):
    """lm-evaluation-harness model `xgen_small`: `--model_args path=DIR[,tokenizer=TOK][,dtype=float32]`, with
    `--batch_size N`. `path` is a Hugging Face checkpoint directory or a run directory of ours (then `tokenizer`
    names its sentencepiece model)."""
    def __init__(self, path: str | None = None, tokenizer: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, dtype: str | None = None, model: Decoder | None = None, tok=None,
                 **_harness_kwargs):
        super().__init__()
        if model is None:
            if path is None: raise ValueError("xgen_small needs model_args path=DIR")
            model, tok = _load(path, tokenizer, dtype)
        self.model, self.tok = model, tok
        self.batch = int(batch_size) if str(batch_size).isdigit() else 8         # 'auto' is not supported: 8
        self._max_length = int(max_length or model.cfg.max_seq_len)

    # --- what TemplateLM asks for
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id if self.tok.eos_id is not None else self.tok.turn_end_ids[0]

    @property
    def prefix_token_id(self) -> int:
        "What an empty context is conditioned on: the BOS token where there is one (as the harness' HF backend does)."
        return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int: return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        "Special tokens written in the string (a rendered chat template) become their ids, as in the harness' backends."
        return self.tok.encode(string, specials=tuple(self.tok.special_ids))

    def tok_decode(self, ids) -> str: return self.tok.decode(ids)

    @property
    def tokenizer_name(self) -> str: return f'xgen_small-{self.tok.fingerprint}'

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        r = render_chat(self.tok, chat_history, add_generation_prompt=add_generation_prompt)
        return self.tok.decode(r.ids, specials=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        "`(sum of log-probabilities of the continuation, whether greedy decoding gives it)` per request."
        seqs = []
        for _, ctx, cont in requests:
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            seqs.append((whole, len(cont)))
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        out = [None] * len(seqs)
        for b in range(0, len(order), self.batch):
            idx = order[b:b + self.batch]
            width = -(-max(len(seqs[i][0]) - 1 for i in idx) // 64) * 64
            tokens = np.zeros((len(idx), width), np.int32); targets = np.zeros_like(tokens); seg = np.zeros_like(tokens)
            for r, i in enumerate(idx):
                s = seqs[i][0]
                tokens[r, :len(s) - 1], targets[r, :len(s) - 1], seg[r, :len(s) - 1] = s[:-1], s[1:], 1
            lp, greedy = (np.asarray(a) for a in _score(self.model, tokens, targets, seg))
            for r, i in enumerate(idx):
                n, k = len(seqs[i][0]) - 1, seqs[i][1]
                out[i] = (float(lp[r, n - k:n].sum()), bool(greedy[r, n - k:n].all()))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        "Whole-text log-probability in disjoint windows of the model's context, each conditioned on what precedes it."
        out = []
        for req in requests:
            (text,) = req.args
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            out.append(sum(s for s, _ in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        "Greedy (or sampled, if the task asks) continuations through the KV cache, cut at the first stop string."
        out = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):                  # one batch shape per set of generation settings
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for members in groups.values():
            kw = dict(requests[members[0]].args[1])
            until = kw.pop('until', None) or [self.tok.decode([self.eot_token_id], specials=True)]
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kw.pop('max_gen_toks', 256))
            temperature = float(kw.pop('temperature', 0.0)) if kw.pop('do_sample', False) else 0.0
            sampling = Sampling(temperature=temperature) if temperature > 0 else Sampling()
            keep = max(1, self.max_length - budget)
            for b in range(0, len(members), self.batch):
                idx = members[b:b + self.batch]
                prompts = [self.tok_encode(requests[i].args[0])[-keep:] or [self.prefix_token_id] for i in idx]
                gen = generate(self.model, prompts, budget, sampling=sampling, stop_tokens=[self.eot_token_id],
                               pad_id=self.tok.pad_id or 0)
                for i, ids in zip(idx, gen.tokens):
                    text = self.tok.decode(ids)
                    cut = min((text.find(u) for u in until if u and u in text), default=len(text))
                    out[i] = text[:cut]
        return out

# %% [markdown]
# ## A task of our own, through the harness, against its Hugging Face backend
#
# Nothing is downloaded: a tiny Llama-format checkpoint with a byte-level BPE tokenizer is written here (notebooks 07
# and 16), and a harness task is defined by a YAML file over a local JSONL file, the way any custom task is. It asks
# the three kinds of question: a multiple choice (log-likelihoods), a perplexity (rolling log-likelihood) and a
# generation with a stop string.

# %%
from flax import nnx
from tokenizers import Tokenizer as HFBackend, decoders, models, pre_tokenizers, trainers
from xgen_small.config import get_preset
from xgen_small.data.sample import load_sample
from xgen_small.hf import save_hf_checkpoint
work = Path(tempfile.mkdtemp())
ckpt = work / 'tiny-llama'; ckpt.mkdir()
bpe = HFBackend(models.BPE())
bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
bpe.train_from_iterator([d['text'] for d in load_sample()[:300]], trainers.BpeTrainer(
    vocab_size=800, special_tokens=['<|begin_of_text|>', '<|eot_id|>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
bpe.save(str(ckpt / 'tokenizer.json'))
(ckpt / 'tokenizer_config.json').write_text(json.dumps(dict(bos_token='<|begin_of_text|>', eos_token='<|eot_id|>',
                                                            tokenizer_class='PreTrainedTokenizerFast')))
save_hf_checkpoint(Decoder(get_preset('tiny', vocab_size=800, max_seq_len=256), rngs=nnx.Rngs(0)), ckpt)

tasks = work / 'tasks'; tasks.mkdir()
rows = [dict(question=f'{a} plus {b} is', choices=[str(a + b), str(a + b + 1), str(a * b)], label=0,
             text=f'The sum of {a} and {b} is {a + b}. ' * 3) for a, b in ((2, 3), (4, 4), (7, 1), (5, 6))]
(tasks / 'sums.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'sums.jsonl'}\ntest_split: test\n"
(tasks / 'sums_mc.yaml').write_text(common + 'task: sums_mc\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                                    'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n')
(tasks / 'sums_ppl.yaml').write_text(common + 'task: sums_ppl\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                                     'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')
(tasks / 'sums_gen.yaml').write_text(common + 'task: sums_gen\noutput_type: generate_until\ndoc_to_text: "{{question}}"\n'
                                     'doc_to_target: "{{choices[0]}}"\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 8\n'
                                     'metric_list:\n  - metric: exact_match\n')
print(sorted(p.name for p in tasks.iterdir()))

# %% [markdown]
# Both backends on the same checkpoint and tasks, every request's answer kept (`log_samples`):

# %%
import logging
import datasets
import lm_eval
from lm_eval.tasks import TaskManager
import contextlib, io
logging.getLogger('lm_eval').setLevel(logging.ERROR); datasets.disable_progress_bars()
manager = TaskManager(include_path=str(tasks))
names = ['sums_mc', 'sums_ppl', 'sums_gen']
with contextlib.redirect_stderr(io.StringIO()):                           # the harness' progress bars
    ours = lm_eval.simple_evaluate(model=XGenSmallLM(str(ckpt), dtype='float32', batch_size=4), tasks=names,
                                   task_manager=manager, log_samples=True)
    theirs = lm_eval.simple_evaluate(model='hf', model_args=f'pretrained={ckpt},dtype=float32', tasks=names,
                                     task_manager=manager, log_samples=True, batch_size=4, device='cpu')
for t in names:
    print(t, {k: round(v, 4) for k, v in ours['results'][t].items() if isinstance(v, float)},
          {k: round(v, 4) for k, v in theirs['results'][t].items() if isinstance(v, float)})

# %%
def responses(res, task):
    return [r for s in sorted(res['samples'][task], key=lambda s: s['doc_id']) for r in s['filtered_resps']]
for t in ('sums_mc', 'sums_ppl'):
    a, b = responses(ours, t), responses(theirs, t)
    test_eq(len(a), len(b))
    for x, y in zip(a, b):
        x, y = (x, y) if isinstance(x, (list, tuple)) else ((x,), (y,))
        test_close(float(x[0]), float(y[0]), eps=1e-3)                   # the same log-likelihoods
        if len(x) > 1: test_eq(bool(x[1]), bool(y[1]))                   # and the same greedy verdicts
test_eq(responses(ours, 'sums_gen'), responses(theirs, 'sums_gen'))      # and the same greedy generations
test_fail(lambda: XGenSmallLM(), contains='path=DIR')

# %% [markdown]
# ## From the command line
#
# The harness' command line finds models only in its own registry, so `xgen-small lm-eval` runs that command line
# with this module imported (which registers `xgen_small`); every argument after it is the harness' own. On a TPU or
# GPU runtime, for a released checkpoint:
#
# ```sh
# xgen-small lm-eval --model xgen_small --model_args path=Salesforce/xgen-small-4B-instruct-r --batch_size 16 \
#     --tasks gsm8k,mmlu --apply_chat_template --output_path results/
# xgen-small lm-eval --model xgen_small --model_args path=DIR --tasks humaneval --confirm_run_unsafe_code
# xgen-small lm-eval --model xgen_small --model_args path=DIR --tasks ruler --metadata '{"max_seq_lengths": [4096, 32768]}'
# ```
#
# (`path` is a local directory; download a checkpoint with `huggingface-cli download` first.) HumanEval executes
# model-written code, which the harness runs unsandboxed unless told otherwise; run it inside a container or with
# our sandbox (notebook 21) in mind. RULER's harness tasks need the tokenizer name the harness asks for in
# `--metadata` and its data downloads.

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
