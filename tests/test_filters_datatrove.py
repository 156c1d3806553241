"""Our Gopher rules decide exactly as datatrove's implementation, document by document.

Both split English words with spaCy's blank English tokenizer, so the decisions must agree on every document: the
sample corpus's web and prose documents, and technical prose the sample does not contain (the docstrings of the
Python standard library, where code spans, `%s` formats and `key/value` pairs made an approximate splitter disagree).
"""
import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

from xgen_small.data.filters import gopher_quality, gopher_repetition
from xgen_small.data.quality import docstring_corpus
from xgen_small.data.sample import load_sample

SAMPLE = [d['text'] for d in load_sample() if d['domain'] in ('web', 'prose')]
DOCSTRINGS = docstring_corpus()


def _theirs(f, text):
    return f.filter(Document(text=text, id='x')) is True


@pytest.mark.parametrize('corpus', ['sample', 'docstrings'])
@pytest.mark.parametrize(
    'ours,theirs',
    [(gopher_quality, GopherQualityFilter()), (gopher_repetition, GopherRepetitionFilter())],
    ids=['quality', 'repetition'],
)
def test_gopher_decisions_agree_with_datatrove(ours, theirs, corpus):
    texts = SAMPLE if corpus == 'sample' else DOCSTRINGS
    assert len(texts) > 300, len(texts)
    differ = [t[:80] for t in texts if (ours(t) is None) != _theirs(theirs, t)]
    assert not differ, f'{len(differ)} of {len(texts)} decisions differ, e.g. {differ[:3]}'


def test_both_drop_the_same_planted_junk():
    docs = [d for d in load_sample() if d['domain'] in ('web', 'prose')]
    for label in ('spam', 'list', 'fragment', 'repetitive'):
        junk = [d['text'] for d in docs if d['meta']['label'] == label]
        ours = sum(gopher_quality(t) is not None or gopher_repetition(t) is not None for t in junk)
        theirs = sum(not (_theirs(GopherQualityFilter(), t) and _theirs(GopherRepetitionFilter(), t)) for t in junk)
        assert ours == theirs == len(junk), label
