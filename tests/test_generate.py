"""Property tests for KV-cache generation: batching and caching never change a token."""
import numpy as np
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xgen_small.config import get_preset
from xgen_small.generate import Sampling, generate, generate_reference
from xgen_small.model import Decoder

CFG = get_preset('tiny', n_layers=2, vocab_size=512)
MODEL = Decoder(CFG, rngs=nnx.Rngs(7))

prompts_st = st.lists(st.lists(st.integers(0, CFG.vocab_size - 1), min_size=1, max_size=30), min_size=1, max_size=4)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=prompts_st, seed=st.integers(0, 2**16), sampled=st.booleans())
def test_cached_equals_recomputed(prompts, seed, sampled):
    sampling = Sampling(temperature=0.9, top_k=40, top_p=0.95) if sampled else Sampling()
    fast = generate(MODEL, prompts, 8, sampling=sampling, seed=seed)
    slow = generate_reference(MODEL, prompts, 8, sampling=sampling, seed=seed)
    assert fast == slow


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=prompts_st)
def test_batch_composition_does_not_matter(prompts):
    batched = generate(MODEL, prompts, 6)
    for p, toks in zip(prompts, batched.tokens):
        assert generate(MODEL, [p], 6).tokens[0] == toks


def test_stop_tokens_end_rows_independently():
    prompts = [[1, 2, 3], [9] * 20]
    free = generate(MODEL, prompts, 16).tokens
    row = free[0]
    j = next((j for j in range(1, len(row)) if row[j] not in row[:j]), None)
    assert j is not None
    stopped = generate(MODEL, prompts, 16, stop_tokens=[row[j]])
    assert stopped.tokens[0] == row[:j] and stopped.stop_tokens[0] == row[j]
    other = stopped.tokens[1]
    assert other == free[1][:len(other)]


def test_prompt_at_the_length_limit():
    p = np.arange(CFG.max_seq_len - 4) % CFG.vocab_size
    out = generate(MODEL, [p.tolist()], 4)
    assert len(out.tokens[0]) == 4
