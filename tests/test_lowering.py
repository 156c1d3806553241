"""Lowering for the accelerators users run on, checked on a CPU: `jax.export` for `tpu` and `cuda` of the training step
(loss and gradients) at the xgen_4b layer shape, of our flash kernel, and of the KV-cache decoder. Nothing is allocated
(abstract shapes only), so 4B-shaped layers are cheap. A lowering that succeeds is not a run: Triton and Mosaic still
compile the kernels on the device; what this guards is every choice and block shape up to that point."""
from functools import partial

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from xgen_small.attention import PLATFORMS, attention, attention_flash, resolve_impl
from xgen_small.config import get_preset
from xgen_small.model import Decoder

TRITON = [jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
PLATFORM = {'tpu': 'tpu', 'cuda': 'gpu'}


def _export(fn, platform, *args):
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=TRITON)(*args).mlir_module()


def _train_step_module(platform, T, impl='auto'):
    cfg = get_preset('xgen_4b', n_layers=2, attention_impl=impl, compute_dtype='bfloat16', max_seq_len=max(T, 4096))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))

    def loss(state, tokens):
        logits = nnx.merge(graphdef, state)(tokens, jnp.arange(T)[None], jnp.ones((1, T), jnp.int32))
        return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1))
    return _export(jax.value_and_grad(loss), platform, state, jax.ShapeDtypeStruct((1, T), jnp.int32))


@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
@pytest.mark.parametrize('T', [200, 256])
def test_xgen_4b_training_step_lowers_with_auto(platform, T):
    text = _train_step_module(platform, T)
    chosen = resolve_impl('auto', T, PLATFORM[platform])
    kernel = {'splash': 'tpu_custom_call', 'flash': '__gpu$xla.gpu.triton', 'blockwise': None}[chosen]
    if kernel:
        assert kernel in text, (platform, T, chosen)  # the real kernel, never its interpret-mode stand-in
    else: assert 'tpu_custom_call' not in text and 'triton' not in text


@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
def test_auto_chooses_an_implementation_that_lowers_at_every_length(platform):
    kind = PLATFORM[platform]
    for T in (1, 7, 100, 127, 128, 129, 384, 1000, 1024):
        name = resolve_impl('auto', T, kind)
        assert kind in PLATFORMS[name]
        args = [jax.ShapeDtypeStruct((1, T, n, 64), jnp.bfloat16) for n in (4, 2, 2)]
        _export(
            jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, impl='auto').astype(jnp.float32)), argnums=(0, 1, 2)),
            platform,
            *args,
        )


@pytest.mark.parametrize(
    'impl,platform',
    [(i, p) for i in ('xla', 'blockwise', 'flash', 'splash') for p in ('tpu', 'cuda') if PLATFORM[p] in PLATFORMS[i]],
)
def test_every_claimed_implementation_lowers_where_claimed(impl, platform):
    T = 512
    args = [jax.ShapeDtypeStruct((2, T, n, 128), jnp.bfloat16) for n in (8, 2, 2)]
    seg = jax.ShapeDtypeStruct((2, T), jnp.int32)
    f = lambda q, k, v, s: jnp.sum(attention(q, k, v, s, s, impl=impl).astype(jnp.float32))
    _export(jax.grad(f, argnums=(0, 1, 2)), platform, *args, seg)


@pytest.mark.parametrize('platform,kernel', [('cuda', '__gpu$xla.gpu.triton'), ('tpu', 'tpu_custom_call')])
@pytest.mark.parametrize('D', [64, 128])
@pytest.mark.parametrize('T', [2048, 8192, 32768])
def test_flash_lowers_as_real_kernels(platform, kernel, D, T):
    "Our flash kernels lower as Triton for a GPU and through Mosaic for a TPU, never as interpret-mode stand-ins."
    args = [jax.ShapeDtypeStruct((1, T, n, D), jnp.bfloat16) for n in (8, 2, 2)]
    f = lambda q, k, v: jnp.sum(attention_flash(q, k, v).astype(jnp.float32))
    text = _export(jax.value_and_grad(f, argnums=(0, 1, 2)), platform, *args)
    assert text.count(kernel) == 3                                    # forward, dK/dV and dQ kernels, compiled


@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
@pytest.mark.parametrize('P', [200, 3000])                 # one-pass prefill, and chunked (1024, 1024 and a first 952)
def test_kv_cache_decoding_lowers(platform, P):
    from xgen_small.generate import _decode
    cfg = get_preset('xgen_4b', n_layers=2, compute_dtype='bfloat16', max_seq_len=4096)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    B = 2
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    f = partial(_decode, graphdef, max_new_tokens=8, chunk=1024)
    _export(
        lambda state, t, s, p, key, stop: f(
            state,
            t,
            s,
            p,
            key,
            jnp.float32(0.0),
            jnp.int32(0),
            jnp.float32(1.0),
            stop,
        ),
        platform,
        state,
        i32(B, P),
        i32(B, P),
        i32(B, P),
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
        i32(1),
    )


@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
@pytest.mark.parametrize('impl,collective', [('seq_ring', 'collective_permute'), ('seq_allgather', 'all_gather')])
def test_sequence_parallel_attention_lowers_on_a_mesh(platform, impl, collective):
    "Forward and backward of the sequence-parallel attention over 8 devices (fsdp 2 x sequence 4), for the accelerator."
    from jax.sharding import NamedSharding, PartitionSpec

    import xgen_small.seqpar  # noqa: F401  (registers seq_ring and seq_allgather)
    from xgen_small.sharding import MeshConfig, make_mesh
    mesh = make_mesh(MeshConfig(fsdp=2, sequence=4))
    spec = NamedSharding(mesh, PartitionSpec('fsdp', 'sequence'))
    args = [jax.ShapeDtypeStruct((2, 2048, n, 128), jnp.bfloat16, sharding=spec) for n in (8, 2, 2)]
    f = lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl).astype(jnp.float32))
    with jax.set_mesh(mesh):
        exported = jax.export.export(jax.jit(jax.grad(f, argnums=(0, 1, 2))), platforms=[platform])(*args)
    assert exported.nr_devices == 8 and collective in exported.mlir_module()
