"""Scripted decoders for testing evaluators end to end: a model that, through the real KV-cache generator, continues
each known prompt with a given reply. Built from the right answers it is an oracle (every evaluator must score it
1.0); built from wrong ones, an anti-oracle (it must score 0). What it checks is everything between the model and the
score: prompt rendering, padding, decoding, stop tokens, detokenisation and answer extraction.

It is a real language model of a degenerate kind: the next token is a table lookup keyed by a hash of the whole
prefix so far, (position, token) pairs summed with random weights. It keeps its history in the KV cache (token ids
written into the key slots), as a Transformer keeps keys there."""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xgen_small.config import ModelConfig
from xgen_small.model import KVCache


def _weights(n: int) -> np.ndarray:
    return np.random.default_rng(1234).integers(1, 2**32, size=n, dtype=np.uint64).astype(np.uint32)


def prefix_hashes(ids: Sequence[int], weights: np.ndarray) -> np.ndarray:
    "uint32 hash of every prefix ids[:t+1]: sum over (position p, token x) of (x + 1) * w[p], wrapping."
    terms = (np.asarray(ids, np.uint64) + 1) * weights[:len(ids)].astype(np.uint64)
    return (np.cumsum(terms) % 2**32).astype(np.uint32)


class ScriptedDecoder(nnx.Module):
    "Continues each prompt of `script` ({prompt ids: reply ids}) with its reply; anything unknown gets `fallback`."

    def __init__(self, cfg: ModelConfig, script: dict[tuple, Sequence[int]], fallback: int):
        if cfg.compute_jnp_dtype != jnp.float32:
            raise ValueError('token ids ride in the cache: use compute_dtype float32')
        self.cfg, w = cfg, _weights(cfg.max_seq_len)
        keys, values = [], []
        for prompt, reply in script.items():
            seq = list(prompt) + list(reply)
            h = prefix_hashes(seq, w)
            keys += h[len(prompt) - 1:len(seq) - 1].tolist(); values += seq[len(prompt):]
        order = np.argsort(np.asarray(keys, np.uint32), kind='stable')
        k = np.asarray(keys, np.uint32)[order]
        if len(np.unique(k)) != len(k):
            raise ValueError('two prefixes share a hash (or a prompt repeats): change the script')
        self.keys, self.values = (
            nnx.Variable(jnp.asarray(k)),
            nnx.Variable(jnp.asarray(np.asarray(values, np.int32)[order])),
        )
        self.w, self.fallback = nnx.Variable(jnp.asarray(w)), fallback

    def forward(self, tokens, positions, segment_ids, cache: KVCache, last_only: bool = False):
        B, T = tokens.shape
        assert last_only or T == 1, (
            'the scripted decoder only decodes (prefill with last_only, then one token at a time)'
        )
        k = jax.lax.dynamic_update_slice(
            cache.k, tokens.astype(cache.k.dtype)[None, :, None, :, None], (0, 0, 0, cache.index, 0)
        )
        seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index))
        pos = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, cache.index))
        cache = cache._replace(k=k, segment_ids=seg, positions=pos, index=cache.index + T)
        ids = k[0, :, 0, :, 0].astype(jnp.uint32)                        # [B, slots]: every token so far
        live = (seg > 0) & (jnp.arange(seg.shape[1]) < cache.index)
        h = jnp.sum(jnp.where(live, (ids + 1) * self.w[...][pos], 0), axis=1, dtype=jnp.uint32)
        i = jnp.clip(jnp.searchsorted(self.keys[...], h), 0, self.keys.shape[0] - 1)
        nxt = jnp.where(self.keys[...][i] == h, self.values[...][i], self.fallback)
        logits = jax.nn.one_hot(nxt, self.cfg.vocab_size) * 100.0
        return logits[:, None, :], cache
