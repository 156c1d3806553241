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
# # Online reinforcement learning with verifiable rewards
#
# > Online RL with verifiable rewards: GRPO's group advantages, clipped ratio, KL and three token aggregations.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/25_rl.ipynb)

# %%
#| default_exp rl

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
# The last stage of xGen-small's post-training is "large-scale reinforcement learning [that] refines the model's
# policy, particularly enhancing reasoning capabilities" in math and code. The recipe the field converged on for
# this is online RL against *verifiable* rewards: the model samples answers to problems whose correctness a program
# can check (a number equals the known answer; the code passes its unit tests), and the policy is pushed towards the
# samples that were right. No reward model is learned, so there is nothing for the policy to exploit except the
# checker itself; which is why the checker must be strict and must never crash or hang.
#
# We implement GRPO (Shao et al., 2024, DeepSeekMath, arXiv 2402.03300). For each prompt $q$ it samples a *group*
# of $G$ completions $o_1..o_G$ from the current policy, scores them $r_1..r_G$, and uses the group itself as the
# baseline instead of a learned value function:
#
# $$\hat A_i = \frac{r_i - \operatorname{mean}(r_{1..G})}{\operatorname{std}(r_{1..G}) + \epsilon}$$
#
# Every token of $o_i$ gets the advantage $\hat A_i$, and the policy maximises PPO's clipped surrogate (Schulman et
# al., 2017) with the importance ratio $\rho_{i,t} = \pi_\theta(o_{i,t}|q, o_{i,<t}) / \pi_{\theta_\text{old}}(o_{i,t}|\ldots)$,
# minus an optional KL penalty towards a frozen reference, estimated per token with the unbiased, always
# non-negative $k_3$ estimator (Schulman, 2020): $\frac{\pi_\text{ref}}{\pi_\theta} - \log\frac{\pi_\text{ref}}{\pi_\theta} - 1$.
#
# $$\mathcal{L} = -\operatorname{agg}_{i,t}\Big[\min\big(\rho_{i,t} \hat A_i,\ \operatorname{clip}(\rho_{i,t}, 1-\varepsilon, 1+\varepsilon)\hat A_i\big) - \beta\, \mathrm{KL}_{i,t}\Big]$$
#
# How the per-token terms are averaged ("agg") matters more than it looks, and papers disagree, so all three
# common choices are here:
#
# | `aggregation` | formula | from |
# |---|---|---|
# | `sequence_mean` | mean over completions of (mean over that completion's tokens) | GRPO as published |
# | `token_mean` | sum over all tokens / number of tokens in the batch | DAPO (Yu et al., 2025, arXiv 2503.14476) |
# | `constant` | sum over all tokens / (completions x max_new_tokens) | Dr. GRPO (Liu et al., 2025, arXiv 2503.20783) |
#
# `sequence_mean` gives each token of a short completion more weight than a token of a long one, which biases
# lengths (long wrong answers are penalised less per token); the other two do not. Dr. GRPO also drops the division
# by the group's standard deviation, which `advantage_scale='none'` selects.

# %%
#| export
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xgen_small.config import ConfigError, ModelConfig
from xgen_small.generate import Sampling, generate
from xgen_small.model import Decoder, model_with_params, token_logps
from xgen_small.posttrain import PostConfig, PostResult, padded_rows, post_train
from xgen_small.tasks import check_tasks, task_rewards
from xgen_small.tokenizer import Tokenizer, render_chat


# %%
import time

from fastcore.test import test_close, test_eq, test_fail

from xgen_small.tasks import arithmetic_tasks, code_tasks, task_reward

# %% [markdown]
# ## Advantages and the loss, as pure functions

# %%
#| export
AGGREGATIONS = ('sequence_mean', 'token_mean', 'constant')

def group_advantages(rewards, scale: str = 'std', eps: float = 1e-6) -> np.ndarray:
    """`[prompts, G]` rewards -> advantages: minus the group mean, divided by the group std (`scale='std'`) or not
    ('none')."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2: raise ValueError(f"rewards must be [prompts, group], got shape {r.shape}")
    if scale not in ('std', 'none'): raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    a = r - r.mean(axis=1, keepdims=True)
    return (a / (r.std(axis=1, keepdims=True) + eps) if scale == 'std' else a).astype(np.float32)

def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps: float = 0.2, kl_beta: float = 0.0,
              aggregation: str = 'token_mean', max_tokens: int | None = None) -> tuple[jax.Array, dict]:
    """The clipped-ratio objective with an optional k3 KL penalty, aggregated over tokens (`[rows, length]` log-probs,
    `[rows]` advantages, `[rows, length]` 0/1 completion mask); returns (loss, metrics). `max_tokens`: the
    `constant` aggregation's per-completion budget (default: the row length)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    ratio = jnp.exp(logps - old_logps)
    adv = advantages[:, None]
    clipped = jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)                     # PPO's pessimistic surrogate
    d = ref_logps - logps
    kl = jnp.exp(d) - d - 1                                                   # k3 estimator of KL(pi || pi_ref)
    per_token = per_token + kl_beta * kl
    n_tok = jnp.maximum(mask.sum(), 1.0)
    if aggregation == 'token_mean': loss = (per_token * mask).sum() / n_tok
    elif aggregation == 'sequence_mean': loss = jnp.mean((per_token * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0))
    else: loss = (per_token * mask).sum() / (mask.shape[0] * (max_tokens or mask.shape[1]))
    was_clipped = (jnp.abs(ratio - 1) > clip_eps) & (mask > 0)
    return loss, dict(kl=(kl * mask).sum() / n_tok, clip_fraction=was_clipped.sum() / n_tok,
                      ratio=(ratio * mask).sum() / n_tok)


# %% [markdown]
# Checks by hand. A group of rewards $(1, 0, 0, 1)$ has mean $0.5$ and standard deviation $0.5$, so advantages
# $(1, -1, -1, 1)$; a group where every completion scores the same carries no signal and gets zero advantages.
# At the sampling policy ($\rho = 1$, no KL) the token-mean loss is minus the mean advantage per token; a token whose
# ratio is 1.5 with a positive advantage is clipped at $1 + \varepsilon = 1.2$, one at 0.5 with a negative advantage
# at $0.8$.

# %%
test_close(group_advantages([[1, 0, 0, 1]]), [[1, -1, -1, 1]], eps=1e-5)
test_eq(group_advantages([[1, 1, 1], [0, 0, 0]]), np.zeros((2, 3), np.float32))
test_eq(group_advantages([[2, 0]], scale='none'), np.array([[1, -1]], np.float32))
z = jnp.zeros((2, 3)); m = jnp.array([[1, 1, 0], [1, 1, 1]], jnp.float32); adv = jnp.array([1.0, -1.0])
loss, met = grpo_loss(z, z, z, adv, m)
test_close(loss, -(2 * 1 + 3 * -1) / 5, eps=1e-6)                        # token_mean: (sum of -A) / 5 tokens
test_close(grpo_loss(z, z, z, adv, m, aggregation='sequence_mean')[0], 0.0, eps=1e-6)   # -(1 + -1) / 2
test_close(grpo_loss(z, z, z, adv, m, aggregation='constant')[0], 1 / 6, eps=1e-6)      # -(2 - 3) / (2 x 3)
test_close(grpo_loss(z, z, z, adv, m, aggregation='constant', max_tokens=5)[0], 1 / 10, eps=1e-6)   # budget 5 tokens
lp = jnp.log(jnp.array([[1.5, 0.5]]))
test_close(grpo_loss(lp, jnp.zeros((1, 2)), lp, jnp.array([1.0]), jnp.ones((1, 2)))[0], -(1.2 + 0.5) / 2, eps=1e-6)
test_close(grpo_loss(lp, jnp.zeros((1, 2)), lp, jnp.array([-1.0]), jnp.ones((1, 2)))[0], (1.5 + 0.8) / 2, eps=1e-6)
# k3 KL is zero at the reference and positive away from it
test_close(grpo_loss(z, z, z, adv, m, kl_beta=1.0)[1]['kl'], 0.0, eps=1e-9)
assert grpo_loss(z, z, z + 0.3, adv, m, kl_beta=1.0)[1]['kl'] > 0
test_fail(lambda: grpo_loss(z, z, z, adv, m, aggregation='sum'), contains='aggregation must be one of')


# %% [markdown]
# ## The RL loop
#
# One step: draw `batch_size` tasks (seeded by `(seed, step)`), sample `group_size` completions for each from the
# current policy with the KV-cache generator (notebook 15) at `temperature`, stop at the end-of-turn token, score
# them, compute the group advantages, and build rows of prompt + completion whose loss mask covers the completion
# (and its end-of-turn token when it has one). The sampling policy's per-token log-probs (the "old" policy of the
# ratio) and, when `kl_beta > 0`, the reference's, are computed once per batch. With `updates_per_batch` $\mu > 1$
# the same samples serve $\mu$ optimizer steps, and the ratio and its clipping start to matter; with $\mu = 1$ the
# ratio is 1 at the step and the objective is the plain policy gradient.
#
# Everything random is keyed by `(seed, step)`, so a run is a function of its config and starting weights, and a
# resumed run repeats an uninterrupted one.

# %%
#| export
@dataclass(frozen=True)
class RLConfig(PostConfig):
    "GRPO: `batch_size` prompts per batch, `group_size` completions each."
    steps: int = 60
    batch_size: int = 8
    group_size: int = 8
    max_new_tokens: int = 24
    temperature: float = 1.0
    lr: float = 3e-4
    clip_eps: float = 0.2
    kl_beta: float = 0.0
    aggregation: str = 'token_mean'
    advantage_scale: str = 'std'
    updates_per_batch: int = 1
    reward_timeout: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        n = type(self).__name__
        if self.group_size < 2:
            raise ConfigError(f"{n}.group_size must be at least 2 (the group is the baseline), got {self.group_size}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"{n}.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.advantage_scale not in ('std', 'none'):
            raise ConfigError(f"{n}.advantage_scale must be 'std' or 'none'")
        if not self.temperature > 0:
            raise ConfigError(f"{n}.temperature must be positive (RL samples), got {self.temperature}")
        if (
            self.updates_per_batch < 1
            or self.steps % self.updates_per_batch
            or self.save_every % self.updates_per_batch
        ):
            raise ConfigError(
                f"{n}: steps and save_every must be multiples of updates_per_batch ({self.updates_per_batch})"
            )
        if self.kl_beta < 0 or not 0 < self.clip_eps < 1:
            raise ConfigError(f"{n}: need kl_beta >= 0 and 0 < clip_eps < 1")

def _sampled_logps(model, b, temperature):
    "Log-probabilities of a batch's targets under `model` at the sampling temperature (the samples' policy)."
    return token_logps(model(b['inputs'], b['positions'], b['segment_ids']) / temperature, b['targets'])

_sampled_logps_jit = jax.jit(_sampled_logps)

def rollout(model: Decoder, tok: Tokenizer, tasks: Sequence[dict], cfg: RLConfig, seed: int) -> dict:
    "Sample `group_size` completions per task and score them: `{'texts', 'tokens', 'rewards' [tasks, G]}`."
    G = cfg.group_size
    prompts = [render_chat(tok, t['prompt'], add_generation_prompt=True).ids for t in tasks for _ in range(G)]
    out = generate(model, prompts, cfg.max_new_tokens, sampling=Sampling(temperature=cfg.temperature),
                   stop_tokens=tok.turn_end_ids, seed=seed)
    tokens = [t + ([s] if s is not None else []) for t, s in zip(out.tokens, out.stop_tokens)]
    texts = [tok.decode(t) for t in out.tokens]
    rewards = np.array(task_rewards([tasks[i // G] for i in range(len(texts))], texts, cfg.reward_timeout)).reshape(
        len(tasks), G
    )
    return dict(prompts=prompts, tokens=tokens, texts=texts, rewards=rewards)

def rl(params: dict, model_cfg: ModelConfig, tok: Tokenizer, tasks: Sequence[dict], cfg: RLConfig, out_dir, *,
       ref_params: dict | None = None, progress: bool = True, stop_at: int | None = None) -> PostResult:
    """GRPO on `tasks` from `params` (the KL reference: `ref_params`, default `params`), checkpointing into `out_dir`.
    The history has, per step, the batch's mean reward, accuracy (reward 1), completion length, KL and clip fraction."""
    if not tasks: raise ValueError("rl needs at least one task")
    check_tasks(tasks)
    if stop_at is not None and stop_at % cfg.updates_per_batch:
        raise ValueError(f"stop_at ({stop_at}) must be a multiple of updates_per_batch ({cfg.updates_per_batch})")
    rows_per_batch = cfg.batch_size * cfg.group_size
    tcfg = dataclasses.replace(cfg, batch_size=rows_per_batch).train_config(model_cfg, 'rl')
    ref = model_with_params(model_cfg, ref_params if ref_params is not None else params) if cfg.kl_beta > 0 else None
    cache = {}
    def batch_fn(step, state, tr):
        k = step // cfg.updates_per_batch                                      # which batch of samples this step uses
        if k not in cache:
            cache.clear()
            rng = np.random.default_rng([cfg.seed, k])
            picked = [tasks[i] for i in rng.choice(len(tasks), cfg.batch_size, replace=len(tasks) < cfg.batch_size)]
            policy = model_with_params(model_cfg, jax.device_get(state['params']))
            ro = rollout(policy, tok, picked, cfg, seed=int(rng.integers(2**31)))
            b = padded_rows(
                [(list(p) + list(c), [0] * len(p) + [1] * len(c)) for p, c in zip(ro['prompts'], ro['tokens'])],
                tcfg.seq_len,
                'prompt + completion',
            )
            b['old'] = np.asarray(_sampled_logps_jit(policy, b, cfg.temperature))
            b['ref'] = np.asarray(_sampled_logps_jit(ref, b, cfg.temperature)) if ref is not None else b['old']
            b['adv'] = group_advantages(ro['rewards'], cfg.advantage_scale).reshape(-1)
            r = ro['rewards']
            metrics = dict(reward=float(r.mean()), accuracy=float((r == 1).mean()),
                           completion_tokens=float(np.mean([len(t) for t in ro['tokens']])), sample=ro['texts'][0])
            cache[k] = b, metrics
        return cache[k]
    def loss_fn(model, b):
        lp = _sampled_logps(model, b, cfg.temperature)
        return grpo_loss(lp, b['old'], b['ref'], b['adv'], b['loss_mask'], cfg.clip_eps, cfg.kl_beta, cfg.aggregation,
                         cfg.max_new_tokens)
    return post_train('rl', tcfg, params, out_dir, batch_fn, dict(rl=cfg.to_dict(), tasks=len(tasks)), loss_fn=loss_fn,
                      progress=progress, stop_at=stop_at)


# %% [markdown]
# A smoke run of the whole loop on a randomly initialised tiny model: three steps, two prompts, four completions
# each, one math and one code task (the code completions are garbage at this point and score 0 without incident).

# %%
import tempfile
from pathlib import Path
from IPython.display import Markdown
from xgen_small.config import get_preset
from xgen_small.posttrain import chat, random_params
from xgen_small.sft import SFTConfig, sft
from xgen_small.tasks import instruction_set, instruction_tokenizer
tok = instruction_tokenizer()
mcfg = get_preset('tiny', vocab_size=tok.vocab_size, max_seq_len=128)
work = Path(tempfile.mkdtemp())
p0 = random_params(mcfg)
smoke = rl(p0, mcfg, tok, arithmetic_tasks(4) + code_tasks(4), RLConfig(steps=3, batch_size=2, group_size=4, seq_len=48,
           max_new_tokens=8, warmup_steps=1, kl_beta=0.05), work / 'smoke', progress=False)
for h in smoke.history: print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()})
test_eq([h['step'] for h in smoke.history], [1, 2, 3])
test_fail(lambda: RLConfig(group_size=1), contains='group_size must be at least 2')
test_fail(lambda: RLConfig(steps=6, warmup_steps=1, updates_per_batch=4), contains='multiples of updates_per_batch')
test_fail(lambda: rl(p0, mcfg, tok, [dict(kind='math', prompt=[])], RLConfig(), work / 'bad'), contains="'prompt' must be a non-empty list")

# %% [markdown]
# ## Learning arithmetic by reward
#
# As in notebook 24, the tiny model is first fine-tuned on the math conversations of notebook 21 (training side of
# the split only), half of whose replies state `The answer is N.` and half stop after the working; the fine-tuned
# model therefore states an answer only some of the time. GRPO then trains it on the *training* questions only (120 of
# the 155), and we
# measure accuracy on the 35 *held-out* questions every 20 steps, both greedy and as the mean over 8 samples at
# temperature 1 (what the RL objective itself optimises).
#
# What transfers to held-out questions is behaviour: stating the answer in the checked form, and committing to
# the result of the working. Arithmetic *facts* do not transfer at this scale: after SFT the model is right on none of
# the held-out questions greedily, and RL lifts that to about a third within 20 steps and no further, sampled accuracy
# from about a tenth to a fifth. (Before every generated family was split by question, SFT also trained on the
# held-out questions and these numbers started near 60%: they measured memory.) The learning rate matters too: at
# 1e-3 (a third of SFT's) the policy drifted faster than the rewards could steer it and accuracy collapsed within 40
# steps.
# (The cells from here on are marked `slow`: about four minutes on two CPU cores, outside CI's default run; their
# outputs are the ones committed.)

# %%
#| slow
from xgen_small.generate import Sampling
sft_res = sft(p0, mcfg, tok, instruction_set(1600, seed=0, shares={'math': 1}),
              SFTConfig(steps=120, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=5), work / 'sft', progress=False)
train, held = arithmetic_tasks(400, seed=0, split='train'), arithmetic_tasks(None, split='test')
def greedy(model, tasks=held):
    replies = chat(model, tok, [t['prompt'] for t in tasks], 24)
    return float(np.mean([task_reward(t, r) for t, r in zip(tasks, replies)]))
def sampled(model, tasks=held, k=8):
    replies = chat(model, tok, [t['prompt'] for t in tasks for _ in range(k)], 24, sampling=Sampling(temperature=1.0), seed=123)
    return float(np.mean([task_reward(tasks[i // k], r) for i, r in enumerate(replies)]))
curve = [dict(step=0, greedy=greedy(sft_res.model()), sampled=sampled(sft_res.model()))]
print(f"after SFT: held-out accuracy {curve[0]['greedy']:.0%} greedy, {curve[0]['sampled']:.0%} sampled")

# %%
#| slow
cfg = RLConfig(steps=60, batch_size=16, group_size=8, seq_len=48, max_new_tokens=24, lr=1e-4, warmup_steps=3, kl_beta=0.05)
t0, history = time.perf_counter(), []
for stop in (20, 40, 60):                     # pause every 20 steps to evaluate; the run resumes exactly
    res = rl(sft_res.params, mcfg, tok, train, cfg, work / 'rl', progress=False, stop_at=stop)
    history += res.history
    curve.append(dict(step=stop, greedy=greedy(res.model()), sampled=sampled(res.model())))
print(f'{cfg.steps} RL steps in {time.perf_counter() - t0:.0f}s (with evaluations)')
Markdown('| RL step | mean reward of the batch | held-out greedy | held-out sampled |\n|---:|---:|---:|---:|\n' + '\n'.join(
    f"| {c['step']} | "
    f"{np.mean([h['reward'] for h in history[max(0, c['step'] - 5):c['step']]]) if c['step'] else history[0]['reward']:.2f} "
    f"| {c['greedy']:.0%} | {c['sampled']:.0%} |" for c in curve))

# %%
#| slow
import matplotlib.pyplot as plt
smooth = lambda xs, k=10: np.convolve(xs, np.ones(k) / k, 'valid')
fig, ax = plt.subplots(1, 3, figsize=(11, 2.8))
r = [h['reward'] for h in history]
ax[0].plot(np.arange(1, len(r) + 1), r, alpha=0.3, c='C0'); ax[0].plot(np.arange(10, len(r) + 1), smooth(r), c='C0')
ax[0].set(xlabel='RL step', ylabel='mean reward of the samples')
ax[1].plot([c['step'] for c in curve], [c['greedy'] for c in curve], 'o-', label='greedy')
ax[1].plot([c['step'] for c in curve], [c['sampled'] for c in curve], 'o-', label='sampled (T=1)')
ax[1].set(xlabel='RL step', ylabel='held-out accuracy', ylim=(0, 1)); ax[1].legend()
ax[2].plot([h['kl'] for h in history]); ax[2].set(xlabel='RL step', ylabel='KL to the reference (k3)')
plt.tight_layout()

# %%
#| slow
before, after = chat(sft_res.model(), tok, [t['prompt'] for t in held[:5]], 24), chat(res.model(), tok, [t['prompt'] for t in held[:5]], 24)
Markdown('| held-out question | after SFT | after RL |\n|---|---|---|\n' + '\n'.join(
    f"| {t['prompt'][0]['content']} | `{b}` | `{a}` |" for t, b, a in zip(held, before, after)))

# %%
#| slow
first, last = np.mean(r[:10]), np.mean(r[-10:])
print(f'mean sampled reward: first 10 steps {first:.2f}, last 10 steps {last:.2f}')
assert last > first + 0.1, (first, last)
assert curve[-1]['greedy'] > curve[0]['greedy'] + 0.25 and curve[-1]['sampled'] > curve[0]['sampled'] + 0.05, curve

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
