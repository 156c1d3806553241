"""Property tests: RULER as published (notebook 32) with a released-style tokenizer (byte-level BPE, tokenizer.json)."""
import functools
import json
import re
import tempfile

from hf_files import write_llama3_style_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from xgen_small import ruler_published as rp
from xgen_small.data.sample import load_sample
from xgen_small.tokenizer import load_tokenizer

DOCS = load_sample()
ESSAYS = rp.load_essays([d['text'] for d in DOCS if d['domain'] == 'prose' and d['meta']['label'] == 'clean'])


@functools.cache
def _tok():
    "A byte-level BPE with Llama 3's special tokens, loaded through the Hugging Face tokenizer interface."
    return load_tokenizer(write_llama3_style_tokenizer(tempfile.mkdtemp(), [d['text'] for d in DOCS[:400]], 3000))


@settings(max_examples=25, deadline=None)
@given(task=st.sampled_from([t for t in rp.SYNTHETIC if t != 'cwe']), length=st.sampled_from([1024, 1536, 3000]),
       seed=st.integers(0, 10 ** 6), bos=st.booleans())
def test_samples_fit_and_hold_their_answers(task, length, seed, bos):
    tok = _tok()
    samples = rp.generate_samples(tok, task, length, 2, seed=seed, essays=ESSAYS, bos=bos)
    for s in samples:
        used = len(tok.encode(s.input + s.answer_prefix)) + int(bos) + s.max_new_tokens
        assert used == s.tokens <= length
        assert s.tokens >= 0.85 * length, (task, length, s.tokens)
        if task != 'fwe': assert all(o in s.input for o in s.outputs)        # the answers are in the context
        assert rp.sample_score(' '.join(s.outputs), s.outputs, s.metric) == 1.0
        json.dumps(s.to_json())


@settings(max_examples=15, deadline=None)
@given(length=st.sampled_from([4096, 6000]), seed=st.integers(0, 10 ** 6))
def test_common_words_counts(length, seed):
    tok = _tok()
    s = rp.generate_samples(tok, 'cwe', length, 1, seed=seed)[0]
    counts = {}
    for w in re.findall(r'\d+\. (.+?)(?= \d+\. |$)', s.input.split('\n')[-2]): counts[w] = counts.get(w, 0) + 1
    assert sorted(counts[w] for w in s.outputs) == [30] * 10
    assert set(c for w, c in counts.items() if w not in s.outputs) == {3}
    assert s.tokens <= length


words = st.text(alphabet='abcXYZ019 ', min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(preds=st.lists(st.text(max_size=30), min_size=1, max_size=5), data=st.data())
def test_scoring_matches_the_definition(preds, data):
    refs = [data.draw(st.lists(words, min_size=1, max_size=4)) for _ in preds]
    found = [[r.lower() in rp.postprocess(p).lower() for r in ref] for p, ref in zip(preds, refs)]
    assert rp.string_match_all(preds, refs) == round(100 * sum(sum(f) / len(f) for f in found) / len(preds), 2)
    assert rp.string_match_part(preds, refs) == round(100 * sum(max(f) for f in found) / len(preds), 2)
    assert rp.string_match_all(preds, refs) <= rp.string_match_part(preds, refs)
