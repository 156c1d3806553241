"""Training at scale on 8 CPU devices: sharded steps equal single-device ones, shardings follow the rules,
resumption across processes is exact, a killed run leaves a readable checkpoint, the CLI works."""
import gzip
import json
import signal
import subprocess
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xgen_small.checkpoint import Checkpointer
from xgen_small.data.curate import CurateConfig, curate
from xgen_small.data.loader import Loader, LoaderConfig, build_token_store
from xgen_small.data.sample import sample_shards
from xgen_small.schedules import default_schedule
from xgen_small.sharding import MeshConfig, logical_spec, make_mesh
from xgen_small.tokenizer import Tokenizer, train_tokenizer
from xgen_small.train import TrainConfig, Trainer


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp('data')
    res = curate(sample_shards()[:2], d / 'c', CurateConfig(workers=1), quality_model=None, progress=False)
    tok = Tokenizer(
        train_tokenizer([json.loads(l)['text'] for p in res.kept_paths for l in gzip.open(p, 'rt')], vocab_size=4096)
    )
    return build_token_store(res.kept_paths, tok, d / 's', plan=res.summary['mixture'])


def _loss_and_grads(cfg, mesh, batch):
    with jax.set_mesh(mesh), nn.logical_axis_rules(cfg.mesh.rules):
        tr = Trainer(cfg, mesh)
        state = tr.init(jax.random.key(0))
        loss, grads = tr.loss_and_grads(state, tr.shard_batch(batch))
        return float(loss), jax.device_get(grads), state


MESHES = [dict(data=8, fsdp=1), dict(fsdp=8), dict(data=2, fsdp=2, sequence=2), dict(fsdp=2, sequence=4),
          dict(fsdp=1, sequence=8), dict(fsdp=2, sequence=2, tensor=2)]


@pytest.mark.parametrize('mesh_kw', MESHES, ids=lambda m: 'x'.join(f'{k}{v}' for k, v in m.items()))
def test_sharded_step_equals_single_device(store, mesh_kw):
    base = TrainConfig(seq_len=128, batch_size=8)
    batch = next(Loader(store, LoaderConfig(seq_len=128, batch_size=8, phase='broad')))
    single_mesh = make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    ref_loss, ref_g, _ = _loss_and_grads(base, single_mesh, batch)
    impl = 'seq_ring' if mesh_kw.get('sequence', 1) > 1 else 'auto'
    cfg = TrainConfig(seq_len=128, batch_size=8, mesh=MeshConfig(**{'fsdp': 1, **mesh_kw}),
                      model=base.model.replace(attention_impl=impl))
    mesh = make_mesh(cfg.mesh)
    loss, grads, state = _loss_and_grads(cfg, mesh, batch)
    assert abs(loss - ref_loss) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), grads, ref_g)
    # every parameter (and its Adam moments) is laid out as the rules say
    names = {'embed': ('vocab', 'embed'), 'lm_head': ('embed', 'vocab')}
    for key, axes in names.items():
        want = jax.sharding.NamedSharding(mesh, logical_spec(axes))
        assert state['params'][key].sharding.is_equivalent_to(want, 2)
        assert state['opt'][1][0].mu[key].sharding.is_equivalent_to(want, 2)
    up = state['params']['layers']['mlp']['up'].sharding
    assert up.is_equivalent_to(jax.sharding.NamedSharding(mesh, logical_spec(('layers', 'embed', 'mlp'))), 3)


def test_allgather_variant_and_accumulation_agree(store):
    batch = next(Loader(store, LoaderConfig(seq_len=128, batch_size=8, phase='broad')))
    single = make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    ref_loss, ref_g, _ = _loss_and_grads(TrainConfig(seq_len=128, batch_size=8), single, batch)
    for cfg in (TrainConfig(seq_len=128, batch_size=8, grad_accum=4),
                TrainConfig(seq_len=128, batch_size=8, mesh=MeshConfig(fsdp=2, sequence=4),
                            model=TrainConfig().model.replace(attention_impl='seq_allgather'))):
        loss, grads, _ = _loss_and_grads(cfg, make_mesh(cfg.mesh), batch)
        assert abs(loss - ref_loss) < 1e-5
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), grads, ref_g)


def _pretrain(store, out, *extra, steps=None, check=True):
    cmd = ['xgen-small', 'pretrain', '--data', str(store.path), '--out', str(out), '--no-progress',
           '--set', 'seq_len=128', '--set', 'save_every=4', '--set', 'log_every=2', *extra]
    if steps: cmd += ['--steps', str(steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check: assert r.returncode == 0, r.stderr[-2000:]
    return r


def _losses(out):
    return [json.loads(l)['loss'] for l in (out / 'history.jsonl').read_text().splitlines()]


def test_resume_across_processes_is_exact(store, tmp_path):
    sched = json.dumps(TrainConfig(schedule=default_schedule(8), save_every=4).to_dict())
    (tmp_path / 'cfg.json').write_text(sched)
    _pretrain(store, tmp_path / 'straight', '--config', str(tmp_path / 'cfg.json'))
    _pretrain(store, tmp_path / 'split', '--config', str(tmp_path / 'cfg.json'), steps=4)     # the process ends here
    assert len(_losses(tmp_path / 'split')) == 4
    _pretrain(store, tmp_path / 'split', '--config', str(tmp_path / 'cfg.json'))              # a new process resumes
    assert _losses(tmp_path / 'split') == _losses(tmp_path / 'straight')


def test_killed_run_leaves_a_readable_checkpoint(store, tmp_path):
    cmd = ['xgen-small', 'pretrain', '--data', str(store.path), '--out', str(tmp_path / 'run'), '--no-progress',
           '--set', 'seq_len=128', '--set', 'save_every=1', '--set', 'schedule.0.steps=400']
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / 'run' / 'checkpoints'
    deadline = time.time() + 300
    while time.time() < deadline and not (ck.exists() and len([d for d in ck.iterdir() if d.name.isdigit()]) >= 3):
        time.sleep(0.5)
    time.sleep(0.7)
    p.send_signal(signal.SIGKILL); p.wait()                   # no chance to finish whatever it was writing
    c = Checkpointer(ck)
    step = c.latest()
    assert step is not None and step >= 3
    cfg = TrainConfig.from_dict(json.loads((tmp_path / 'run' / 'config.json').read_text()))
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(cfg.mesh.rules):
        tr = Trainer(cfg, mesh)
        state, loader, _ = c.restore(step, (jax.eval_shape(tr._init, jax.random.key(0)), tr.state_sharding))
    assert int(state['step']) == step and loader['state']['step'] == step
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state['params']))
    # and the run picks up from there, with the losses an uninterrupted run has at the same steps
    _pretrain(store, tmp_path / 'run', '--set', 'schedule.0.steps=400', steps=step + 2, check=True)
    _pretrain(store, tmp_path / 'straight', '--set', 'schedule.0.steps=400', steps=step + 2, check=True)
    resumed, straight = (
        {h['step']: h['loss'] for h in map(json.loads, (tmp_path / d / 'history.jsonl').read_text().splitlines())}
        for d in ('run', 'straight')
    )
    after = sorted(s for s in resumed if s > step)
    assert after and after[-1] == step + 2 and [resumed[s] for s in after] == [straight[s] for s in after]


def test_pretraining_crosses_the_anneal_boundary(store, tmp_path):
    from xgen_small.train import _loader_for, train
    cfg = TrainConfig(schedule=default_schedule(6, anneal_fraction=0.5), seq_len=128, save_every=100)
    res = train(cfg, store, tmp_path / 'run', progress=False, peak_flops=1e12)
    assert [h['phase'] for h in res.history] == ['broad'] * 3 + ['anneal'] * 3
    assert res.history[-1]['lr'] < 0.6 * res.history[3]['lr']                 # the anneal decays the learning rate
    _, loader, _ = Checkpointer(tmp_path / 'run' / 'checkpoints').restore(
        6, (jax.eval_shape(res.trainer._init, jax.random.key(0)), res.trainer.state_sharding))
    assert loader['phase'] == 'anneal'
    # the anneal phase's pass draws the anneal mixture (notebook 05): less web, more of the curated domains
    web = store.meta['domains'].index('web')
    share = {ph: float(store.lengths[o][store.domains[o] == web].sum() / store.lengths[o].sum())
             for ph in ('broad', 'anneal') for o in [_loader_for(store, cfg, ph)._order(0)]}
    assert share['anneal'] < share['broad'] - 0.1, share


def test_cli_reports_divergence_and_bad_overrides(store, tmp_path):
    r = _pretrain(
        store,
        tmp_path / 'bad',
        '--set',
        'schedule.0.peak_lr=1e6',
        '--set',
        'schedule.0.warmup_steps=0',
        steps=20,
        check=False,
    )
    assert r.returncode == 3 and 'loss is nan' in r.stderr
    r = _pretrain(store, tmp_path / 'typo', '--set', 'model.widht=3', check=False)
    assert r.returncode == 2 and "no config field 'model.widht'" in r.stderr


def test_a_stage_loss_trains_the_same_with_its_length_sharded(tmp_path):
    """Post-training's path through the one loop (generated batches, the stage's own loss, metrics returned beside the
    batch) with rows over `data` only, and with rows over `fsdp` and the length over a 4-way `sequence` ring
    (zigzag-balanced): the same losses, step for step."""
    from xgen_small.posttrain import padded_rows
    from xgen_small.schedules import LRPhase
    from xgen_small.train import GeneratedBatches, fit

    rng = np.random.default_rng(0)
    seqs = [(rng.integers(5, 4000, int(n)).tolist(), [0] * 8 + [1] * (int(n) - 8)) for n in rng.integers(20, 64, 8)]
    rows = padded_rows(seqs, 64)

    def batches(step, state, trainer):
        return rows, dict(rows_seen=float((step + 1) * len(seqs)))

    def loss_fn(model, b):
        logits = model(b['inputs'], b['positions'], b['segment_ids']).astype(jnp.float32)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), b['targets'][..., None], -1)[..., 0]
        per_row = (lp * b['loss_mask']).sum(-1) / b['loss_mask'].sum(-1)
        return -per_row.mean(), dict(mean_logp=per_row.mean())

    losses = {}
    for name, mesh, impl in (('rows', MeshConfig(data=8, fsdp=1), 'auto'),
                             ('rows+length', MeshConfig(fsdp=2, sequence=4), 'seq_ring')):
        cfg = TrainConfig(model=TrainConfig().model.replace(attention_impl=impl), mesh=mesh, seq_len=64, batch_size=8,
                          schedule=(LRPhase('sft', 3, 1e-3),), weight_decay=0.0)
        r = fit(cfg, GeneratedBatches(batches), tmp_path / name, stage='sft', loss_fn=loss_fn, progress=False)
        assert [h['rows_seen'] for h in r.history] == [8.0, 16.0, 24.0]        # the batch function's own metrics
        assert all('mean_logp' in h and 'grad_norm' in h for h in r.history)   # and the loss's
        losses[name] = [h['loss'] for h in r.history]
    np.testing.assert_allclose(losses['rows+length'], losses['rows'], rtol=1e-5)
    assert losses['rows'][-1] < losses['rows'][0]
