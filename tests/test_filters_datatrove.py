"""Agreement of our Gopher rules with datatrove's implementation, document by document, on the sample corpus.

datatrove splits English words with spaCy; we approximate that splitter without depending on spaCy, so
a handful of borderline documents may flip. We require at least 99% agreement on keep/drop decisions.
"""
import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

from xgen_small.data.filters import gopher_quality, gopher_repetition
from xgen_small.data.sample import load_sample

DOCS = [d for d in load_sample() if d['domain'] in ('web', 'prose')]


def _theirs(f, text):
    r = f.filter(Document(text=text, id='x'))
    return r is True


@pytest.mark.parametrize(
    'ours,theirs',
    [(gopher_quality, GopherQualityFilter()), (gopher_repetition, GopherRepetitionFilter())],
    ids=['quality', 'repetition'],
)
def test_gopher_decisions_agree_with_datatrove(ours, theirs):
    agree = [(ours(d['text']) is None) == _theirs(theirs, d['text']) for d in DOCS]
    rate = sum(agree) / len(agree)
    bad = [d['id'] for d, a in zip(DOCS, agree) if not a]
    print(f'{ours.__name__}: {rate:.2%} agreement on {len(DOCS)} documents; disagreements: {bad[:10]}')
    assert rate >= 0.99, f'only {rate:.2%} agreement; disagreements include {bad[:10]}'


def test_both_drop_the_same_planted_junk():
    for label in ('spam', 'list', 'fragment', 'repetitive'):
        docs = [d for d in DOCS if d['meta']['label'] == label]
        ours = sum(gopher_quality(d['text']) is not None or gopher_repetition(d['text']) is not None for d in docs)
        theirs = sum(
            not (_theirs(GopherQualityFilter(), d['text']) and _theirs(GopherRepetitionFilter(), d['text']))
            for d in docs
        )
        assert ours == theirs == len(docs), label
