"""Per-device memory of sequence-parallel attention at the xgen extension shapes, compiled on 8 simulated CPU devices.

    python benchmarks/seqpar_memory.py            # xgen_4b heads at 32K / 128K / 256K (about a minute)
    python benchmarks/seqpar_memory.py --quick    # small heads and lengths (smoke run, used by tests)

One attention layer's forward and backward (`jax.grad` of a loss over its output), bfloat16, sharded over the mesh's
`sequence` axis at the degree the `xgen` extension recipe gives each stage, the rest of the 8 devices on `data`.
Nothing is run: the numbers are the temporary memory XLA's compiler reports per device. The reference is the same
layer written plainly (`attention_reference` on sequence-sharded inputs, left to XLA's sharding propagation), whose
`[T, T]` score matrix is what ring attention exists to avoid. Ring attention is compiled in both its forms: the hops
as a loop (what TPUs and GPUs run) and unrolled (what the CPU runtime needs); the loop's memory stays flat as the
ring grows, the unrolled form's grows by a few hundred MB per hop under XLA's CPU compiler.
"""
import argparse
import os
from functools import partial

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true')
    a = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from xgen_small.attention import attention_reference
    from xgen_small.config import get_preset
    from xgen_small.extend import EXTENSION_PRESETS
    from xgen_small.seqpar import attention_allgather, attention_ring
    from xgen_small.sharding import MeshConfig, make_mesh

    if a.quick: (H, K, D), shapes = (4, 2, 16), ((1024, 2), (4096, 2), (4096, 8))
    else:
        m = get_preset('xgen_4b'); H, K, D = m.n_heads, m.n_kv_heads, m.head_dim
        shapes = tuple((s.seq_len, s.sequence) for s in EXTENSION_PRESETS['xgen'].stages)
    n_dev = min(8, jax.device_count())
    print(f'one attention layer, forward + backward, {H} query / {K} key-value heads of {D}, bfloat16; '
          f'temporary memory per device (GiB), {n_dev} devices')
    print(f"{'tokens':>8} {'sequence':>8} {'per device':>10} | {'ring (loop)':>11} {'ring (unrolled)':>15} "
          f"{'all-gather':>10} {'plain XLA':>9}")
    rows = []
    for T, seq in shapes:
        seq = min(seq, n_dev)
        mesh = make_mesh(MeshConfig(data=n_dev // seq, fsdp=1, sequence=seq))
        B = n_dev // seq                                         # one row per device
        spec = NamedSharding(mesh, P('data', 'sequence'))
        q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16, sharding=spec)
        kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16, sharding=spec)
        r = dict(tokens=T, sequence=seq, per_device=T // seq)
        impls = (('ring', partial(attention_ring, loop=True)), ('ring_unrolled', partial(attention_ring, loop=False)),
                 ('allgather', attention_allgather), ('xla', attention_reference))
        for name, fn in impls:
            loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
            with jax.set_mesh(mesh):
                c = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
            r[name] = c.memory_analysis().temp_size_in_bytes / 2**30
        print(f"{T:>8,} {seq:>8} {T // seq:>10,} | {r['ring']:>11.2f} {r['ring_unrolled']:>15.2f} "
              f"{r['allgather']:>10.2f} {r['xla']:>9.1f}", flush=True)
        rows.append(r)
    return rows


if __name__ == '__main__':
    main()
