"""Training throughput: our jitted train step vs a `transformers` LlamaForCausalLM step (CPU torch, AdamW),
same shapes, same run; with our MFU relative to this machine's measured matmul peak.

    python benchmarks/train.py           # tiny preset and a width-512 model, batch 8 x 256
    python benchmarks/train.py --quick   # tiny only, few steps (smoke run, used by tests)

Both sides: float32, one device, AdamW with weight decay, global-norm clipping, cross-entropy over all
positions. Timing excludes compilation / the first step. "unrolled" is `scan_layers=False`: on a CPU,
slicing stacked weights inside `lax.scan` costs about 10%; on accelerators scanning keeps compile
time flat in depth and is the default.
"""
import argparse
import os
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true')
    a = ap.parse_args(argv)
    import flax.linen as nn
    import jax
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from xgen_small.config import get_preset
    from xgen_small.schedules import LRPhase
    from xgen_small.sharding import MeshConfig, make_mesh
    from xgen_small.train import TrainConfig, Trainer, flops_per_token, measured_peak_flops

    torch.set_num_threads(os.cpu_count())
    B, T = 8, 256
    steps = 3 if a.quick else 10
    tiny = get_preset('tiny', compute_dtype='float32')
    wide = get_preset(
        'tiny', d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=64, d_ff=1536, compute_dtype='float32'
    )
    models = {'tiny': tiny, 'tiny, unrolled': tiny.replace(scan_layers=False)}
    if not a.quick: models.update({'width 512': wide, 'w512 unrolled': wide.replace(scan_layers=False)})
    peak = max(measured_peak_flops() for _ in range(3))
    print(
        f'train-step benchmark: batch {B} x {T}, float32, 1 device, {os.cpu_count()} CPUs; measured matmul peak '
        f'{peak / 1e9:.0f} GFLOP/s'
    )
    print(f"{'model':15} {'params':>10} | {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>6} | {'our MFU':>8}")
    rows = []
    rng = np.random.default_rng(0)
    for name, mc in models.items():
        tokens = rng.integers(0, mc.vocab_size, (B, T + 1))
        batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=np.ones((B, T), np.int32),
                     positions=np.broadcast_to(np.arange(T), (B, T)), loss_mask=np.ones((B, T), np.float32))
        cfg = TrainConfig(
            model=mc, seq_len=T, batch_size=B, schedule=(LRPhase('broad', 1000, 1e-3),), mesh=MeshConfig(fsdp=1)
        )
        mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
        with jax.set_mesh(mesh), nn.logical_axis_rules(cfg.mesh.rules):
            tr = Trainer(cfg, mesh)
            state = tr.init(jax.random.key(0))
            sb = tr.shard_batch(batch)
            state, m = tr.step(state, sb); jax.block_until_ready(m)
            t0 = time.perf_counter()
            for _ in range(steps): state, m = tr.step(state, sb)
            jax.block_until_ready(m)
            ours = steps * B * T / (time.perf_counter() - t0)
        hf = (
            LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=mc.vocab_size,
                    hidden_size=mc.d_model,
                    intermediate_size=mc.d_ff,
                    num_hidden_layers=mc.n_layers,
                    num_attention_heads=mc.n_heads,
                    num_key_value_heads=mc.n_kv_heads,
                    head_dim=mc.head_dim,
                    max_position_embeddings=T,
                    tie_word_embeddings=False,
                )
            )
            .float()
            .train()
        )
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        ids = torch.as_tensor(tokens)
        def hf_step():
            loss = hf(ids[:, :-1], labels=ids[:, :-1]).loss   # transformers shifts labels itself
            loss.backward(); torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0); opt.step(); opt.zero_grad()
        hf_step()
        t0 = time.perf_counter()
        for _ in range(steps): hf_step()
        theirs = steps * B * T / (time.perf_counter() - t0)
        mfu = ours * flops_per_token(mc, T) / peak
        n = sum(p.numel() for p in hf.parameters())
        rows.append(dict(model=name, ours=ours, hf=theirs, mfu=mfu))
        print(f'{name:15} {n:>10,} | {ours:>11,.0f} {theirs:>19,.0f} {ours / theirs:>5.2f}x | {mfu:>8.1%}')
    return rows


if __name__ == '__main__':
    main()
