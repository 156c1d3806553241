"""Post-training from the command line and as properties: `xgen-small sft` -> `dpo` -> `rl`, each reading a JSON
config file and starting from the previous stage's run; config and data errors; determinism of RL for a seed; and
properties of the pure losses (hypothesis). The hand-checked values of each loss are in notebooks 24 and 25."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xgen_small.cli import main
from xgen_small.data.sample import load_sample
from xgen_small.dpo import dpo_loss
from xgen_small.rl import group_advantages, grpo_loss
from xgen_small.tasks import instruction_set
from xgen_small.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp('post')
    texts = [x['text'] for x in load_sample()[:300]] + [
        m['content'] for c in instruction_set(300, seed=1) for m in c['messages']
    ]
    Tokenizer(train_tokenizer(texts, 4096)).save(d / 'tok.model')
    (d / 'sft.json').write_text(json.dumps(dict(steps=3, batch_size=8, seq_len=128, warmup_steps=1)))
    (d / 'dpo.json').write_text(
        json.dumps(dict(steps=2, batch_size=4, seq_len=64, warmup_steps=1, beta=0.2, sft_weight=0.5))
    )
    (d / 'rl.json').write_text(
        json.dumps(dict(steps=2, batch_size=2, group_size=4, seq_len=48, max_new_tokens=8, warmup_steps=1))
    )
    return d


def _cli(d, *args):
    return main([*args, '--tokenizer', str(d / 'tok.model'), '--no-progress'])


def test_sft_dpo_rl_chain(work, capsys):
    d = work
    assert _cli(d, 'sft', '--init', 'tiny', '--config', str(d / 'sft.json'), '--n', '64', '--out', str(d / 'sft')) == 0
    assert 'sft: steps 1-3' in capsys.readouterr().out
    pairs = d / 'pairs.jsonl'
    pairs.write_text(
        '\n'.join(
            json.dumps(
                dict(
                    prompt=[dict(role='user', content=f'What is {i} + 1?')],
                    chosen=f'The answer is {i + 1}.',
                    rejected=f'The answer is {i}.',
                )
            )
            for i in range(6)
        )
    )
    assert (
        _cli(
            d,
            'dpo',
            '--init',
            str(d / 'sft'),
            '--config',
            str(d / 'dpo.json'),
            '--data',
            str(pairs),
            '--out',
            str(d / 'dpo'),
        )
        == 0
    )
    out = capsys.readouterr().out
    assert 'dpo: steps 1-2' in out and 'reward_accuracy' in out
    tasks = d / 'tasks.jsonl'
    tasks.write_text(
        '\n'.join(
            [
                json.dumps(dict(kind='math', prompt=[dict(role='user', content='What is 2 + 2?')], answer='4')),
                json.dumps(
                    dict(
                        kind='code',
                        prompt=[dict(role='user', content='Write `f(x)` returning x.')],
                        tests=['f(1) == 1'],
                    )
                ),
            ]
        )
    )
    assert _cli(d, 'rl', '--init', str(d / 'dpo'), '--ref', str(d / 'sft'), '--config', str(d / 'rl.json'),
                '--data', str(tasks), '--out', str(d / 'rl')) == 0
    assert 'rl: steps 1-2' in capsys.readouterr().out
    from xgen_small.checkpoint import load_run
    _, saved = load_run(d / 'rl')
    assert saved['stage'] == 'rl' and saved['rl']['group_size'] == 4
    hist = [json.loads(l) for l in (d / 'rl' / 'history.jsonl').read_text().splitlines()]
    assert [h['step'] for h in hist] == [1, 2] and all(0 <= h['reward'] <= 1 for h in hist)
    # a finished run is not trained again
    assert (
        _cli(
            d,
            'rl',
            '--init',
            str(d / 'dpo'),
            '--config',
            str(d / 'rl.json'),
            '--data',
            str(tasks),
            '--out',
            str(d / 'rl'),
        )
        == 0
    )
    assert 'nothing to do' in capsys.readouterr().out


def test_errors_are_clear(work, capsys):
    d = work
    (d / 'bad.json').write_text(json.dumps(dict(stepz=3)))
    assert _cli(d, 'sft', '--init', 'tiny', '--config', str(d / 'bad.json'), '--out', str(d / 'x')) == 2
    assert "SFTConfig has no field(s) ['stepz']" in capsys.readouterr().err
    (d / 'notjson.json').write_text('{steps: 3')
    assert _cli(d, 'dpo', '--init', 'tiny', '--config', str(d / 'notjson.json'), '--out', str(d / 'x')) == 2
    assert 'not valid JSON' in capsys.readouterr().err
    (d / 'rl_bad.json').write_text(json.dumps(dict(group_size=1)))
    assert _cli(d, 'rl', '--init', 'tiny', '--config', str(d / 'rl_bad.json'), '--out', str(d / 'x')) == 2
    assert 'group_size must be at least 2' in capsys.readouterr().err
    (d / 'broken.jsonl').write_text('{"messages": []}\nnot json\n')
    assert (
        _cli(
            d,
            'sft',
            '--init',
            'tiny',
            '--config',
            str(d / 'sft.json'),
            '--data',
            str(d / 'broken.jsonl'),
            '--out',
            str(d / 'x'),
        )
        == 2
    )
    assert 'broken.jsonl line 2: not JSON' in capsys.readouterr().err
    (d / 'kinds.jsonl').write_text(json.dumps(dict(kind='essay', prompt=[dict(role='user', content='hi')])))
    assert (
        _cli(
            d,
            'rl',
            '--init',
            'tiny',
            '--config',
            str(d / 'rl.json'),
            '--data',
            str(d / 'kinds.jsonl'),
            '--out',
            str(d / 'y'),
        )
        == 2
    )
    assert "unknown task kind 'essay'" in capsys.readouterr().err
    assert _cli(d, 'sft', '--init', str(d / 'missing'), '--out', str(d / 'x')) == 2
    assert 'no checkpoints in' in capsys.readouterr().err


def test_rl_is_deterministic_for_a_seed(work, tmp_path):
    from xgen_small.config import get_preset
    from xgen_small.posttrain import random_params
    from xgen_small.rl import RLConfig, rl
    from xgen_small.tasks import arithmetic_tasks
    tok = Tokenizer(work / 'tok.model')
    mcfg = get_preset('tiny', vocab_size=tok.vocab_size, max_seq_len=64)
    p0, tasks = random_params(mcfg, 1), arithmetic_tasks(8)
    cfg = RLConfig(steps=4, batch_size=2, group_size=4, seq_len=48, max_new_tokens=8, warmup_steps=0, lr=1e-3,
                   updates_per_batch=2, save_every=2, kl_beta=0.05, aggregation='sequence_mean')
    a = rl(p0, mcfg, tok, tasks, cfg, tmp_path / 'a', progress=False)
    rl(p0, mcfg, tok, tasks, cfg, tmp_path / 'b', progress=False, stop_at=2)          # interrupted after one batch ...
    b = rl(p0, mcfg, tok, tasks, cfg, tmp_path / 'b', progress=False)                 # ... and resumed
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)): np.testing.assert_array_equal(x, y)
    assert [h['sample'] for h in a.history[2:]] == [h['sample'] for h in b.history]
    assert a.history[0]['ratio'] == pytest.approx(1.0, abs=1e-5)  # first update: at the sampling policy
    assert a.history[1]['ratio'] != pytest.approx(1.0, abs=1e-5)  # second: same samples, moved policy


floats = st.floats(-20, 20, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=2, max_size=6), min_size=1, max_size=4
    ).filter(lambda g: len({len(r) for r in g}) == 1)
)  # rewards as they come: fractions of tests passed
def test_group_advantages_are_centred_and_scale_free(groups):
    a = group_advantages(groups)
    np.testing.assert_allclose(a.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(group_advantages(np.asarray(groups) * 3 + 1), a, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(floats, floats, floats, floats, st.floats(0.01, 2), st.floats(0, 0.49))
def test_dpo_swapping_answers_swaps_label_smoothing(pc, pr, rc, rr, beta, eps):
    x = [jnp.array([v]) for v in (pc, pr, rc, rr)]
    swapped = dpo_loss(x[1], x[0], x[3], x[2], beta, 1 - eps)[0] if eps > 0 else None
    loss, m = dpo_loss(*x, beta, eps)
    if swapped is not None: np.testing.assert_allclose(loss, swapped, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m['reward_margin'], beta * ((pc - rc) - (pr - rr)), rtol=1e-4, atol=1e-4)
    z = beta * ((pc - rc) - (pr - rr))                                      # the loss by hand, in float64
    by_hand = (1 - eps) * np.logaddexp(0, -z) + eps * np.logaddexp(0, z)
    np.testing.assert_allclose(float(loss), by_hand, rtol=1e-4, atol=1e-4)


@jax.jit
def _loss_and_grad(lp, adv, mask):
    loss, met = grpo_loss(lp, lp, lp, adv, mask, aggregation='token_mean')
    g = jax.grad(lambda p: grpo_loss(p, jax.lax.stop_gradient(p), lp, adv, mask)[0])(lp)
    return loss, met, g


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 10_000))
def test_grpo_at_the_sampling_policy_is_the_policy_gradient(rows, length, seed):
    rng = np.random.default_rng(seed)
    lp = jnp.asarray(rng.normal(size=(rows, length)) - 2, jnp.float32)
    adv = jnp.asarray(rng.normal(size=rows), jnp.float32)
    mask = jnp.asarray(rng.random((rows, length)) < 0.7, jnp.float32)
    loss, met, g = _loss_and_grad(lp, adv, mask)
    n = max(float(mask.sum()), 1.0)
    np.testing.assert_allclose(loss, -float((adv[:, None] * mask).sum()) / n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, -adv[:, None] * mask / n, rtol=1e-5, atol=1e-6)   # d/d logp of -A * ratio
    assert float(met['clip_fraction']) == 0 and abs(float(met['kl'])) < 1e-6
