"""Parity with `transformers`' Llama: same logits from the same weights, in both directions."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from xgen_small.config import ModelConfig
from xgen_small.hf import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from xgen_small.model import Decoder

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.15)
CONFIGS = {
    'mha': dict(num_key_value_heads=4),
    'gqa': dict(num_key_value_heads=2, rope_theta=50_000.0),
    'mqa-tied': dict(num_key_value_heads=1, tie_word_embeddings=True),
    'head_dim': dict(num_key_value_heads=2, head_dim=32),
    'linear-rope': dict(num_key_value_heads=2, rope_scaling={'rope_type': 'linear', 'factor': 4.0}),
    'llama3-rope': dict(num_key_value_heads=2, rope_theta=500_000.0, rope_scaling={
        'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
        'original_max_position_embeddings': 64}),
}


def _hf_model(overrides, seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**BASE, **overrides)).float().eval()
    with torch.no_grad():  # random norm scales too, so that a transposed norm cannot hide
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'): p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def _hf_logits(model, tokens):
    with torch.no_grad(): return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


TOKENS = np.random.default_rng(0).integers(0, BASE['vocab_size'], size=(2, 200))


@pytest.mark.parametrize('name', CONFIGS)
def test_import_matches_transformers(tmp_path, name):
    hf = _hf_model(CONFIGS[name])
    hf.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(tmp_path, compute_dtype='float32')
    err = np.max(np.abs(np.asarray(ours(TOKENS)) - _hf_logits(hf, TOKENS)))
    assert err < 1e-4, f'{name}: max |logit difference| {err:.2e}'


@pytest.mark.parametrize('name', ['gqa', 'mqa-tied', 'llama3-rope'])
def test_export_reloads_in_transformers(tmp_path, name):
    cfg = ModelConfig.from_hf(LlamaConfig(**BASE, **CONFIGS[name]).to_dict(), compute_dtype='float32', init_std=0.15)
    ours = Decoder(cfg, rngs=nnx.Rngs(1))
    save_hf_checkpoint(ours, tmp_path / 'export', max_shard_bytes=2**18)  # several shards + index
    hf = LlamaForCausalLM.from_pretrained(tmp_path / 'export', dtype=torch.float32).eval()
    err = np.max(np.abs(np.asarray(ours(TOKENS)) - _hf_logits(hf, TOKENS)))
    assert err < 1e-4, f'{name}: max |logit difference| {err:.2e}'
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings


def test_bfloat16_checkpoint_loads(tmp_path):
    hf = _hf_model(CONFIGS['gqa']).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ours = load_hf_checkpoint(tmp_path, compute_dtype='float32')
    assert ours.embed[...].dtype == jnp.float32
    # the same bf16 weights computed in float32 (a fresh load: `.float()` would keep a bf16-rounded RoPE buffer)
    ref = _hf_logits(LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval(), TOKENS)
    assert np.max(np.abs(np.asarray(ours(TOKENS)) - ref)) < 1e-3


def test_mismatched_checkpoint_is_refused(tmp_path):
    _hf_model(CONFIGS['gqa']).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    (tmp_path / 'config.json').write_text(json.dumps(cfg | {'intermediate_size': 128}))
    with pytest.raises(CheckpointError, match='mlp.gate_proj.weight: checkpoint has'):
        load_hf_checkpoint(tmp_path)
    (tmp_path / 'config.json').write_text(json.dumps(cfg | {'num_hidden_layers': 4}))
    with pytest.raises(CheckpointError, match='missing tensor'):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize('mesh_cfg', [dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_checkpoint_streams_onto_a_mesh(tmp_path, mesh_cfg):
    "A transformers checkpoint loaded straight into FSDP shards on 8 devices: same logits, each device its part only."
    import jax

    from xgen_small.hf import _layer_map, _weight_files, read_safetensors
    from xgen_small.sharding import MeshConfig, make_mesh
    hf = _hf_model(CONFIGS['gqa'])
    hf.save_pretrained(tmp_path, max_shard_size='200KB')                # several safetensors files
    mesh = make_mesh(MeshConfig(**mesh_cfg))
    ours = load_hf_checkpoint(tmp_path, mesh=mesh, compute_dtype='float32')
    err = np.max(np.abs(np.asarray(jax.jit(lambda m, t: m(t))(ours, TOKENS)) - _hf_logits(hf, TOKENS)))
    assert err < 1e-4, f'max |logit difference| {err:.2e}'
    up = ours.layers.mlp.up.get_value()
    assert up.sharding.mesh.shape == mesh.shape
    assert up.addressable_shards[0].data.size * mesh.shape['fsdp'] * mesh.shape['tensor'] == up.size
    # the name map's layout changes are views of the memory-mapped tensors: a shard's slice reads only its bytes
    tensors = {k: v for f in _weight_files(tmp_path) for k, v in read_safetensors(f).items()}
    for suffix, (_, to_ours, _) in _layer_map(ours.cfg).items():
        t = tensors[f'model.layers.1.{suffix}']
        assert np.shares_memory(to_ours(t), t), suffix
