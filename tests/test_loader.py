"""Loader properties over many shapes: exact resumption, disjoint process shares, target/mask invariants."""
import gzip
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xgen_small.data.curate import CurateConfig, curate
from xgen_small.data.loader import Loader, LoaderConfig, build_token_store
from xgen_small.data.sample import sample_shards
from xgen_small.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp('store')
    res = curate(sample_shards()[:1], d / 'c', CurateConfig(workers=1), quality_model=None, progress=False)
    tok = Tokenizer(
        train_tokenizer([json.loads(l)['text'] for p in res.kept_paths for l in gzip.open(p, 'rt')], vocab_size=1024)
    )
    return build_token_store(res.kept_paths, tok, d / 's', plan=res.summary['mixture'])


configs = st.builds(
    lambda L, B, split, seed, phase: LoaderConfig(seq_len=L, batch_size=B, split=split, seed=seed, phase=phase),
    st.integers(8, 300),
    st.integers(1, 4),
    st.sampled_from(['fill', 'boundary']),
    st.integers(0, 9),
    st.sampled_from([None, 'broad', 'anneal']),
)
many = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@many
@given(cfg=configs, n=st.integers(0, 40), m=st.integers(1, 15))
def test_resume_is_exact(store, cfg, n, m):
    straight = Loader(store, cfg)
    expected = [next(straight) for _ in range(n + m)][n:]
    first = Loader(store, cfg)
    for _ in range(n): next(first)
    resumed = Loader(store, cfg, state=json.loads(json.dumps({k: int(v) for k, v in first.state.to_pytree().items()})))
    for a in expected:
        b = next(resumed)
        assert all(np.array_equal(a[k], b[k]) for k in a)


@many
@given(cfg=configs, procs=st.integers(2, 4))
def test_process_shares_are_disjoint_and_complete(store, cfg, procs):
    whole = Loader(store, cfg)._order(0)
    parts = [
        Loader(store, LoaderConfig(**{**cfg.__dict__, 'process_index': p, 'process_count': procs}))._order(0)
        for p in range(procs)
    ]
    assert sorted(np.concatenate(parts).tolist()) == sorted(whole.tolist())
    assert [len(p) for p in parts] == [len(whole[i::procs]) for i in range(procs)]


@many
@given(cfg=configs)
def test_targets_and_masks(store, cfg):
    b = next(Loader(store, cfg))
    seg, toks, tgt, mask = b['segment_ids'], b['inputs'], b['targets'], b['loss_mask']
    same = np.zeros_like(mask, bool); same[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    assert np.array_equal(mask.astype(bool), same)
    assert np.array_equal(tgt[:, :-1][same[:, :-1]], toks[:, 1:][same[:, :-1]])
    for r in range(len(seg)):      # positions count from 0 within each segment
        for s in set(seg[r].tolist()) - {0}:
            assert b['positions'][r][seg[r] == s].tolist() == list(range((seg[r] == s).sum()))
    if cfg.split == 'fill': assert (seg > 0).all()
