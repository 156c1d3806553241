"""Loader throughput vs what the tiny model consumes, measured in the same run.

    python benchmarks/loader.py           # seq_len 512, batch 8
    python benchmarks/loader.py --quick   # smoke run (used by tests)

The loader (packing + batching from the memory-mapped token store, mixture-sampled) must produce
tokens far faster than a training step eats them, so that data loading never stalls training. The
consumer here is a jitted forward + backward + AdamW update of the `tiny` model on the same batch shape.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--seq-len', type=int, default=512)
    ap.add_argument('--batch', type=int, default=8)
    a = ap.parse_args(argv)
    import gzip

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from xgen_small.config import get_preset
    from xgen_small.data.curate import CurateConfig, curate
    from xgen_small.data.loader import Loader, LoaderConfig, build_token_store
    from xgen_small.data.sample import sample_shards
    from xgen_small.model import Decoder
    from xgen_small.tokenizer import Tokenizer, train_tokenizer

    L, B = (128, 4) if a.quick else (a.seq_len, a.batch)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        res = curate(
            sample_shards()[: 1 if a.quick else None],
            tmp / 'c',
            CurateConfig(workers=1),
            quality_model=None,
            progress=False,
        )
        texts = [json.loads(l)['text'] for p in res.kept_paths for l in gzip.open(p, 'rt')]
        tok = Tokenizer(train_tokenizer(texts, vocab_size=4096))
        store = build_token_store(res.kept_paths, tok, tmp / 's', plan=res.summary['mixture'])
        loader = Loader(store, LoaderConfig(seq_len=L, batch_size=B, phase='broad'), tokenizer=tok)
        n = 20 if a.quick else 500
        next(loader)
        t0 = time.perf_counter()
        for _ in range(n): batch = next(loader)
        loader_tps = n * L * B / (time.perf_counter() - t0)

    cfg = get_preset('tiny', max_seq_len=max(512, L))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, b):
        def loss_fn(m):
            logits = m(b['inputs'], b['positions'], b['segment_ids'])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, b['targets'])
            return jnp.sum(ce * b['loss_mask']) / jnp.maximum(jnp.sum(b['loss_mask']), 1)
        loss, g = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, g)
        return loss
    jb = {k: jnp.asarray(v) for k, v in batch.items() if k != 'domain_tokens'}
    step(model, opt, jb).block_until_ready()
    m = 3 if a.quick else 10
    t0 = time.perf_counter()
    for _ in range(m): loss = step(model, opt, jb)
    loss.block_until_ready()
    model_tps = m * L * B / (time.perf_counter() - t0)
    print(f'loader benchmark: batch {B} x {L}, {jax.devices()[0].platform}')
    print(f"{'loader (pack + batch)':28}{loader_tps:>14,.0f} tokens/s")
    print(f"{'tiny model train step':28}{model_tps:>14,.0f} tokens/s")
    print(f"{'headroom':28}{loader_tps / model_tps:>13,.0f}x")
    return dict(loader=loader_tps, model=model_tps)


if __name__ == '__main__':
    main()
