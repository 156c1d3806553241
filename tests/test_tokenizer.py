"""Property tests: the tokenizer and the chat template are lossless for any Unicode text."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xgen_small.data.sample import load_sample
from xgen_small.tokenizer import MARKERS, ROLES, Tokenizer, parse_chat, render_chat, train_tokenizer

TOK = Tokenizer(train_tokenizer([d['text'] for d in load_sample()[:400]], vocab_size=1024))

# all of Unicode except surrogates (not valid in UTF-8): letters, CJK, emoji, controls, combining marks, U+2581
texts = st.text(alphabet=st.characters(blacklist_categories=('Cs',)), max_size=300)
spiky = st.lists(
    st.sampled_from(
        ['\u2581', ' ', '\n', '\t', '\x00', '😀', '中文', 'é', 'e\u0301', '<think>', '<|user|>', '12345', 'word']
    ),
    max_size=40,
).map(''.join)


@settings(max_examples=400, deadline=None)
@given(text=st.one_of(texts, spiky))
def test_roundtrip(text):
    assert TOK.decode(TOK.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(texts, spiky))
def test_roundtrip_with_markers(text):
    assert TOK.decode(TOK.encode(text, specials=MARKERS), specials=True) == text


@settings(max_examples=50, deadline=None)
@given(batch=st.lists(st.one_of(texts, spiky), max_size=8))
def test_batch_equals_single(batch):
    assert TOK.encode_batch(batch) == [TOK.encode(t) for t in batch]


@settings(max_examples=150, deadline=None)
@given(msgs=st.lists(st.tuples(st.sampled_from(ROLES), st.one_of(texts, spiky)), max_size=5))
def test_chat_roundtrip(msgs):
    messages = [dict(role=r, content=c) for r, c in msgs]
    r = render_chat(TOK, messages)
    assert parse_chat(TOK, r.ids) == messages
    assert len(r.ids) == len(r.mask) and all(m in (0, 1) for m in r.mask)


@given(prefix=texts, suffix=texts, surrogate=st.integers(0xD800, 0xDFFF))
def test_lone_surrogates_are_refused_or_replaced(prefix, suffix, surrogate):
    text = prefix + chr(surrogate) + suffix
    with pytest.raises(ValueError, match='lone surrogate'):
        TOK.encode(text)
    assert TOK.decode(TOK.encode(text, errors='replace')) == prefix + '\ufffd' + suffix
