"""Length extension end to end on 8 host devices: `xgen-small pretrain` -> `extend` (a target stage on a 2-way and an
over-length stage on a 4-way sequence-parallel ring) -> `eval`, resumption of a finished extension, and the errors
users get. (The preset recipes' shapes are tested in notebook 20; sharded-step equivalence up to 8-way sequence
sharding in test_train.py.)"""
import json
import subprocess

import numpy as np
import pytest

from xgen_small.data.sample import load_sample
from xgen_small.tokenizer import Tokenizer, train_tokenizer


def _run(*args, timeout=600):
    return subprocess.run(['xgen-small', *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    from xgen_small.config import get_preset
    from xgen_small.extend import write_store
    from xgen_small.schedules import LRPhase
    from xgen_small.train import TrainConfig
    d = tmp_path_factory.mktemp('ext')
    docs = load_sample()
    tok = Tokenizer(train_tokenizer([x['text'] for x in docs[:400]], 4096))
    tok.save(d / 'tok.model')
    write_store([dict(text=x['text'], domain=x['domain']) for x in docs[:300]], tok, d / 'store')
    cfg = TrainConfig(
        model=get_preset('tiny'), seq_len=256, batch_size=8, schedule=(LRPhase('broad', 4, 1e-3),), save_every=4
    )
    (d / 'pre.json').write_text(json.dumps(cfg.to_dict()))
    r = _run(
        'pretrain',
        '--data',
        str(d / 'store'),
        '--out',
        str(d / 'pre'),
        '--config',
        str(d / 'pre.json'),
        '--no-progress',
    )
    assert r.returncode == 0, r.stderr
    return d


def test_extend_then_eval(pretrained):
    d = pretrained
    from xgen_small.extend import extension_recipe
    recipe = extension_recipe(
        512, 10_000.0, 32, (1024,), steps=(3, 2), batch_sizes=(4, 2), peak_lr=1e-3, sequence=(2, 4)
    )
    (d / 'recipe.json').write_text(json.dumps(recipe.to_dict()))
    args = ('extend', '--run', str(d / 'pre'), '--tokenizer', str(d / 'tok.model'), '--out', str(d / 'ext'),
            '--recipe', str(d / 'recipe.json'), '--no-progress')
    r = _run(*args)
    assert r.returncode == 0, r.stderr
    for stage, L in (('stage1', 1024), ('overlength', 2048)):
        assert f'{stage}: {L:>7,} tokens' in r.stdout, r.stdout
        hist = [json.loads(l) for l in (d / 'ext' / stage / 'history.jsonl').read_text().splitlines()]
        assert hist and all(np.isfinite(h['loss']) for h in hist)
    from xgen_small.checkpoint import load_run
    model, saved = load_run(d / 'ext' / 'overlength')
    # trained on a 4-way sequence ring
    assert saved['train']['seq_len'] == 2048 and saved['train']['mesh']['sequence'] == 4
    assert saved['train']['mesh']['fsdp'] == 2  # the other 2 devices shard the batch
    assert saved['model']['attention_impl'] == 'seq_ring' and model.cfg.attention_impl == 'auto'
    assert saved['model']['rope_theta'] == pytest.approx(10_000 * 2**2)  # the target stage's critical-pair base, kept
    # finished stages are skipped on a second run (no file of theirs is written again), and give the same model
    written = {
        f: f.stat().st_mtime_ns
        for stage in ('stage1', 'overlength')
        for f in (d / 'ext' / stage).rglob('*')
        if f.is_file()
    }
    assert any('checkpoints' in f.parts for f in written)
    again = _run(*args)
    assert again.returncode == 0, again.stderr
    assert {f: f.stat().st_mtime_ns for f in written} == written
    m2, _ = load_run(d / 'ext' / 'overlength')
    import jax

    from xgen_small.model import params_of
    a, b = (jax.tree.leaves(params_of(m)) for m in (model, m2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    r = _run(
        'eval',
        '--run',
        str(d / 'ext' / 'overlength'),
        '--tokenizer',
        str(d / 'tok.model'),
        '--tasks',
        'niah_single,vt',
        '--lengths',
        '512,1024',
        '--n',
        '2',
        '--perplexity-store',
        str(d / 'store'),
        '--out',
        str(d / 'res'),
    )
    assert r.returncode == 0, r.stderr
    assert '| niah_single |' in r.stdout and '| **mean** |' in r.stdout
    res = json.loads((d / 'res' / 'results.json').read_text())
    assert {(x['task'], x['length']) for x in res['ruler']} == {
        (t, L) for t in ('niah_single', 'vt') for L in (512, 1024)
    }
    assert len(res['perplexity']) == 8 and (d / 'res' / 'heatmap.png').stat().st_size > 1000


def test_eval_of_pretrained_run_beyond_its_length(pretrained):
    d = pretrained
    r = _run(
        'eval',
        '--run',
        str(d / 'pre'),
        '--tokenizer',
        str(d / 'tok.model'),
        '--tasks',
        'niah_single',
        '--lengths',
        '1024',
        '--n',
        '2',
    )
    assert r.returncode == 0, r.stderr                           # max_seq_len 512 is only a guard; RoPE goes further


def test_clear_errors(pretrained, tmp_path):
    d = pretrained
    r = _run('eval', '--run', str(tmp_path / 'nothing'), '--tokenizer', str(d / 'tok.model'))
    assert r.returncode == 2 and 'no checkpoints' in r.stderr and 'Traceback' not in r.stderr
    r = _run('eval', '--run', str(d / 'pre'), '--tokenizer', str(d / 'tok.model'), '--tasks', 'passkey')
    assert r.returncode == 2 and 'unknown task' in r.stderr
    bad = tmp_path / 'recipe.json'
    bad.write_text(
        json.dumps(
            dict(
                base_len=512,
                base_theta=10000.0,
                stages=[dict(name='s', seq_len=256, rope_theta=1e4, steps=1, batch_size=1, peak_lr=1e-3)],
            )
        )
    )
    r = _run(
        'extend',
        '--run',
        str(d / 'pre'),
        '--tokenizer',
        str(d / 'tok.model'),
        '--out',
        str(tmp_path / 'x'),
        '--recipe',
        str(bad),
    )
    assert r.returncode == 2 and 'increase' in r.stderr
    docs = tmp_path / 'docs.jsonl'
    docs.write_text('{"text": "fine"}\nnot json\n')
    r = _run(
        'extend',
        '--run',
        str(d / 'pre'),
        '--tokenizer',
        str(d / 'tok.model'),
        '--out',
        str(tmp_path / 'y'),
        '--docs',
        str(docs),
    )
    assert r.returncode == 2 and 'line 2' in r.stderr
