"""The pipeline's copy bootstrap (`PipelineConfig.copy_bootstrap`, notebook 40): a short run on key-value recall
documents whose weights pre-training starts from. Checked on real stages at a few steps each: the bootstrap run, its
store and summary; pre-training starting from it (its first loss differs from a run from scratch on the same
batches); fingerprints unchanged when it is off; the report's row; a bad value refused."""
import json
import shutil
from dataclasses import replace

import pytest

from xgen_small.config import ConfigError
from xgen_small.pipeline import Pipeline, bootstrap_config, fingerprints, pipeline_config
from xgen_small.report import read_history


def _quick(**kw):
    c = pipeline_config('cpu', steps_scale=0.01).with_overrides(['quality_model=none'])
    return replace(c, anneal_ablation=False, **kw)


def test_bootstrap_config_keeps_the_tokens_per_step():
    pre = pipeline_config('cpu').pretrain
    b = bootstrap_config(pre, 300)
    assert (b.seq_len, b.batch_size * b.seq_len) == (128, pre.batch_size * pre.seq_len)
    assert (b.weight_decay, b.split, b.model) == (0.0, 'boundary', pre.model)
    assert [(p.name, p.steps, p.peak_lr, p.decay) for p in b.schedule] == [('bootstrap', 300, 3e-3, 'constant')]
    assert pipeline_config('cpu', steps_scale=0.1).copy_bootstrap == 0                  # off unless asked for
    assert replace(pipeline_config('cpu'), copy_bootstrap=300).copy_bootstrap == 300
    with pytest.raises(ConfigError, match='copy_bootstrap'):
        replace(pipeline_config('cpu'), copy_bootstrap=-1)


def test_pretraining_starts_from_the_bootstrap(tmp_path):
    off, on = _quick(), _quick(copy_bootstrap=4)
    fo, fn = fingerprints(off), fingerprints(on)
    assert fo['curate'] == fn['curate'] and fo['tokenizer'] == fn['tokenizer'] and fo['pretrain'] != fn['pretrain']
    assert fingerprints(replace(off, copy_bootstrap=0)) == fo
    a = tmp_path / 'on'
    sums = Pipeline(on, a, progress=False).run(stop_after='pretrain')
    boot = sums['pretrain']['copy_bootstrap']
    assert (boot['steps'], boot['rows']) == (4, '32 x 128') and 0.0 <= boot['recall'] <= 1.0, boot
    h = read_history(a / 'pretrain' / 'bootstrap')
    assert [x['step'] for x in h] == [1, 2, 3, 4] and {x['phase'] for x in h} == {'bootstrap'}
    meta = json.loads((a / 'pretrain' / 'bootstrap' / 'data' / 'meta.json').read_text())
    assert meta['domains'] == ['recall'] and meta['n_tokens'] >= 4 * 32 * 128
    # the same pre-training from scratch (curation and tokenizer copied): same batches, another starting point
    b = tmp_path / 'off'
    b.mkdir()
    for s in ('curate', 'tokenizer'): shutil.copytree(a / s, b / s)
    Pipeline(off, b, progress=False).run(stop_after='pretrain')
    first = lambda d: read_history(d / 'pretrain')[0]
    assert first(a)['tokens'] == first(b)['tokens'] and first(a)['loss'] != pytest.approx(first(b)['loss'], abs=1e-4)
    # resuming finds every stage done, bootstrap included; the report's row names it
    assert set(Pipeline(on, a).status().values()) >= {'done'} and Pipeline(on, a).status()['pretrain'] == 'done'
    from xgen_small.report import _bootstrap_result
    assert _bootstrap_result(sums['pretrain']).startswith('; after a 4-step copy bootstrap (key-value recall ')
    assert _bootstrap_result(Pipeline(off, b).marker('pretrain')['summary']) == ''
