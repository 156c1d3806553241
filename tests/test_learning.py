"""Seconds-long learning checks for each post-training stage: the loss starts where the mathematics says, and a few
steps move the model the way the method promises (and the opposite way when the data are reversed). Pre-training's
check (crossing the anneal boundary) is in tests/test_train.py, beside its token store."""
import math

import numpy as np
import pytest

from xgen_small.config import get_preset
from xgen_small.dpo import DPOConfig, arithmetic_pairs, dpo, pair_rows, reference_logps
from xgen_small.generate import Sampling
from xgen_small.model import model_with_params
from xgen_small.posttrain import chat, random_params
from xgen_small.rl import RLConfig, rl
from xgen_small.sft import SFTConfig, sft
from xgen_small.tasks import instruction_set, instruction_tokenizer, task_rewards


@pytest.fixture(scope='module')
def setup():
    tok = instruction_tokenizer()
    mcfg = get_preset('tiny', vocab_size=tok.vocab_size, max_seq_len=128)
    return tok, mcfg, random_params(mcfg)


def _margin(tok, mcfg, params, pairs):
    "Mean log p(chosen) - log p(rejected) of the replies under `params`."
    rows = pair_rows(tok, pairs, 64)
    m = model_with_params(mcfg, params)
    return float(np.mean(reference_logps(m, rows['chosen']) - reference_logps(m, rows['rejected'])))


def test_dpo_starts_at_log2_and_moves_towards_the_chosen(setup, tmp_path):
    tok, mcfg, p0 = setup
    pairs = arithmetic_pairs(16, seed=3)
    cfg = DPOConfig(steps=6, batch_size=8, seq_len=64, lr=1e-3, warmup_steps=1, beta=0.5)
    right = dpo(p0, mcfg, tok, pairs, cfg, tmp_path / 'right', progress=False)
    assert right.history[0]['loss'] == pytest.approx(math.log(2), abs=1e-5)       # the policy is the reference
    assert right.history[0]['reward_margin'] == pytest.approx(0, abs=1e-5)
    swapped = dpo(p0, mcfg, tok, [dict(p, chosen=p['rejected'], rejected=p['chosen']) for p in pairs], cfg,
                  tmp_path / 'swapped', progress=False)
    m0 = _margin(tok, mcfg, p0, pairs)
    assert _margin(tok, mcfg, right.params, pairs) > m0 + 1.0          # nats: the right answers became likelier...
    assert _margin(tok, mcfg, swapped.params, pairs) < m0 - 1.0  # ...or the wrong ones, when the labels are swapped
    assert right.history[-1]['loss'] < math.log(2) < swapped.history[0]['loss'] + 1e-5


def test_sft_reproduces_its_conversations(setup, tmp_path):
    tok, mcfg, p0 = setup
    convs = [c for c in instruction_set(60, seed=7) if len(c['messages']) == 2][:8]
    res = sft(
        p0,
        mcfg,
        tok,
        convs,
        SFTConfig(steps=60, batch_size=8, seq_len=128, lr=3e-3, warmup_steps=3),
        tmp_path / 'sft',
        progress=False,
    )
    want = [c['messages'][-1]['content'] for c in convs]
    assert chat(model_with_params(mcfg, p0), tok, [c['messages'][:-1] for c in convs], 64) != want
    assert chat(res.model(), tok, [c['messages'][:-1] for c in convs], 64) == want


def test_grpo_raises_the_reward_of_one_question(setup, tmp_path):
    tok, mcfg, p0 = setup
    q = [dict(role='user', content='What is 2 + 3?')]
    # a policy that states 5 or 6 about equally often: GRPO must make 5 the habit
    convs = [
        dict(domain='math', messages=q + [dict(role='assistant', content=f'The answer is {a}.')]) for a in (5, 6) * 4
    ]
    start = sft(
        p0,
        mcfg,
        tok,
        convs,
        SFTConfig(steps=60, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=2),
        tmp_path / 'sft',
        progress=False,
    )
    task = dict(kind='math', prompt=q, answer='5')

    def sampled_reward(params, k=64):
        replies = chat(model_with_params(mcfg, params), tok, [q] * k, 12, sampling=Sampling(temperature=1.0), seed=99)
        return float(np.mean(task_rewards([task] * k, replies)))
    before = sampled_reward(start.params)
    res = rl(
        start.params,
        mcfg,
        tok,
        [task],
        RLConfig(steps=8, batch_size=1, group_size=16, seq_len=48, max_new_tokens=12, lr=1e-3, warmup_steps=1),
        tmp_path / 'rl',
        progress=False,
    )
    after = sampled_reward(res.params)
    assert 0.15 < before < 0.85, before                  # both answers were being sampled, so there was signal
    assert after > before + 0.2, (before, after)
