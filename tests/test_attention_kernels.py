"""Kernels against the reference over many shapes: forward and gradients, block sizes, GQA, segments, masks.

Pallas kernels run in interpret mode on the CPU (real Pallas lowering of our kernel bodies, executed as JAX ops)."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings, strategies as st

from xgen_small.attention import BlockSizes, attention_blockwise, attention_flash, attention_reference, attention_splash
from xgen_small.config import get_preset
from xgen_small.model import Decoder


def _inputs(seed, B, T, H, K, D, layout):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, D)); k = jax.random.normal(ks[1], (B, T, K, D)); v = jax.random.normal(ks[2], (B, T, K, D))
    if layout == 'one': seg = jnp.zeros((B, T), jnp.int32)
    elif layout == 'packed': seg = jnp.sort(jax.random.randint(ks[3], (B, T), 0, 4), axis=1)
    else: seg = jax.random.randint(ks[3], (B, T), 0, 3)            # interleaved segments: a stress test of the mask
    return q, k, v, seg


def _compare(fn, q, k, v, seg, causal, tol):
    # index-causal masking is what the kernels implement: pass index positions to the reference
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), seg.shape)
    ref = lambda q, k, v: attention_reference(q, k, v, seg, seg, pos, pos, causal=causal)
    mine = lambda q, k, v: fn(q, k, v, seg, seg, causal=causal)
    w = jax.random.normal(jax.random.key(9), q.shape)
    for f in (mine, ref): assert f(q, k, v).shape == q.shape
    np.testing.assert_allclose(mine(q, k, v), ref(q, k, v), atol=tol, rtol=tol)
    gm = jax.grad(lambda *a: jnp.sum(mine(*a) * w), argnums=(0, 1, 2))(q, k, v)
    gr = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b, name in zip(gm, gr, ('dq', 'dk', 'dv')):
        np.testing.assert_allclose(a, b, atol=tol * 10, rtol=tol * 10, err_msg=name)


shapes = st.tuples(st.integers(1, 2), st.integers(1, 100), st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (6, 2), (8, 1)]),
                   st.sampled_from([8, 16, 32]))
layouts = st.sampled_from(['one', 'packed', 'interleaved'])


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, bq=st.integers(1, 64), bk=st.integers(1, 64), layout=layouts, causal=st.booleans(), seed=st.integers(0, 99))
def test_blockwise_matches_reference(shape, bq, bk, layout, causal, seed):
    B, T, (H, K), D = shape
    _compare(partial(attention_blockwise, block_sizes=BlockSizes(bq, bk)), *_inputs(seed, B, T, H, K, D, layout), causal, 2e-5)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, bq=st.sampled_from([16, 32, 64]), bk=st.sampled_from([16, 32, 64]), bwd=st.sampled_from([None, 16]),
       layout=layouts, causal=st.booleans(), seed=st.integers(0, 99))
def test_flash_matches_reference(shape, bq, bk, bwd, layout, causal, seed):
    B, T, (H, K), D = shape
    blocks = BlockSizes(bq, bk, bwd, bwd)
    _compare(partial(attention_flash, block_sizes=blocks, interpret=True), *_inputs(seed, B, T, H, K, D, layout), causal, 2e-5)


@pytest.mark.parametrize('causal,layout,heads', [(True, 'packed', (4, 2)), (False, 'one', (2, 2))])
def test_splash_matches_reference(causal, layout, heads):
    (H, K) = heads
    _compare(partial(attention_splash, block_sizes=BlockSizes(128, 128), interpret=True), *_inputs(0, 2, 256, H, K, 16, layout), causal, 5e-5)


def test_model_is_the_same_function_under_every_implementation():
    tokens = jax.random.randint(jax.random.key(0), (2, 128), 0, 4096)
    seg = jnp.repeat(jnp.arange(1, 3), 64)[None].repeat(2, 0)
    pos = jnp.tile(jnp.arange(64), 2)[None].repeat(2, 0)
    def loss_and_grads(impl):
        m = Decoder(get_preset('tiny', attention_impl=impl, attn_block_q=32, attn_block_kv=32), rngs=nnx.Rngs(0))
        return nnx.value_and_grad(lambda m: jnp.mean(m(tokens, pos, seg) ** 2))(m)
    ref_loss, ref_g = loss_and_grads('xla')
    for impl in ('blockwise', 'flash'):
        loss, g = loss_and_grads(impl)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), nnx.state(g), nnx.state(ref_g))
