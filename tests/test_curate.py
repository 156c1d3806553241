"""The curation pipeline end to end: accounting, determinism across worker counts, executors and hash partitions,
the sharded dedup against its one-process definition, hostile input, the CLI."""
import gzip
import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xgen_small.data.curate import CurateConfig, curate, dedup_in_memory, resolve_duplicates, survivors
from xgen_small.data.sample import sample_shards


def _files(d: Path) -> dict:
    out = {}
    for p in sorted(d.rglob('*')):
        if p.is_file() and p.name != 'summary.json' and p.suffix != '.npz':
            out[str(p.relative_to(d))] = gzip.decompress(p.read_bytes()) if p.suffix == '.gz' else p.read_bytes()
    return out


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
    "The sample shards, plus a hostile shard and a truncated gzip shard."
    d = tmp_path_factory.mktemp('in')
    hostile = d / 'hostile.jsonl.gz'
    lines = [
        b'{"text": "no id, no domain"}',
        b'{"id": 7, "domain": "web", "text": 12}',
        b'\xff\xfe garbage',
        b'{"id": "s", "domain": "web", "text": "lone \\ud800 surrogate"}',
        b'null',
        b'   ',
        b'{"id": "dup-a", "domain": "math", "text": "Problem 1. Compute 2 + 2. The sum is 4. Answer: 4. Problem 2. '
        b'Compute 3 * 5. The product is 15. Answer: 15."}',
        b'{"id": "dup-b", "domain": "math", "text": "Problem 1. Compute 2 + 2. The sum is 4. Answer: 4. Problem 2. '
        b'Compute 3 * 5. The product is 15. Answer: 15."}',
    ]
    hostile.write_bytes(gzip.compress(b'\n'.join(lines) + b'\n'))
    full = gzip.compress(b'{"id": "t1", "domain": "web", "text": "x"}\n' * 2000)
    truncated = d / 'truncated.jsonl.gz'
    truncated.write_bytes(full[: len(full) // 2])
    return [*sample_shards()[:2], hostile, truncated]


@pytest.fixture(scope='module')
def runs(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp('out')
    one = curate(shards, out / 'w1', CurateConfig(workers=1), quality_model=None, progress=False)
    two = curate(shards, out / 'w2', CurateConfig(workers=2), quality_model=None, progress=False)
    return one, two


def test_ray_executor_gives_the_local_result(shards, runs, tmp_path):
    "The per-shard stage as Ray tasks on a local 2-CPU Ray instance: every output file identical to the local run's."
    from xgen_small.data.curate import RayExecutor
    r = curate(shards, tmp_path / 'ray', CurateConfig(workers=1), quality_model=None, progress=False,
               executor=RayExecutor(num_cpus=2))
    assert _files(r.out_dir) == _files(runs[0].out_dir)
    same = lambda s: {k: v for k, v in s.items() if k not in ('seconds', 'peak_rss_mb')}
    assert same(r.summary) == same(runs[0].summary)


def test_every_line_is_accounted_for(runs):
    s = runs[0].summary
    ledger = list(runs[0].ledger())
    assert s['kept'] + s['dropped'] == s['lines'] == len(ledger) == sum(i['lines'] for i in s['inputs'])
    assert len({(e['shard'], e['line']) for e in ledger}) == len(ledger)
    assert all((e['status'] == 'kept') == (e['reason'] is None) for e in ledger)
    kept = sum(1 for p in runs[0].kept_paths for _ in gzip.open(p, 'rt'))
    assert kept == s['kept']


def test_hostile_input_is_tagged_not_fatal(runs):
    ledger = list(runs[0].ledger())
    hostile = {e['line']: e for e in ledger if e['shard'] == 2}
    assert [hostile[i]['reason'] for i in range(1, 7)] == [
        'input.unknown_domain',
        'input.missing_text',
        'input.invalid_utf8',
        'input.invalid_unicode',
        'input.not_an_object',
        'input.blank_line',
    ]
    assert {hostile[7]['reason'], hostile[8]['reason']} == {None, 'dedup.exact'}
    kept, dup = sorted((hostile[7], hostile[8]), key=lambda e: e['reason'] is not None)
    assert kept['reason'] is None and dup['reason'] == 'dedup.exact' and dup['duplicate_of'] == kept['id']
    truncated = runs[0].summary['inputs'][3]
    assert truncated['error'] and 'EOFError' in truncated['error'] and truncated['lines'] > 0


def test_result_does_not_depend_on_worker_count(runs):
    one, two = (_files(r.out_dir) for r in runs)
    assert one.keys() == two.keys() and one == two


def test_cli_curate(shards, tmp_path):
    r = subprocess.run(
        [
            'xgen-small',
            'curate',
            *map(str, shards[2:]),
            '--out',
            str(tmp_path / 'o'),
            '--quality-model',
            'none',
            '--no-progress',
            '--default-domain',
            'web',
            '--partitions',
            '3',
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert 'dropped' in r.stdout and 'EOFError' in r.stderr
    s = json.loads((tmp_path / 'o' / 'summary.json').read_text())
    assert s['kept'] + s['dropped'] == s['lines'] and s['dedup']['partitions'] == 3
    r = subprocess.run(
        ['xgen-small', 'curate', 'no/such/file.jsonl', '--out', str(tmp_path / 'p')], capture_output=True, text=True
    )
    assert r.returncode == 2 and 'not found' in r.stderr


def test_cli_curate_on_ray(shards, tmp_path):
    "`--executor ray` from the command line (a local Ray of --workers CPUs); `--address` only with it."
    base = ['xgen-small', 'curate', *map(str, shards[2:]), '--quality-model', 'none', '--no-progress',
            '--default-domain', 'web']
    r = subprocess.run([*base, '--out', str(tmp_path / 'r'), '--executor', 'ray', '--workers', '2'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ledger = [json.loads(line) for p in sorted((tmp_path / 'r' / 'ledger').glob('*.jsonl.gz'))
              for line in gzip.open(p, 'rt')]
    s = json.loads((tmp_path / 'r' / 'summary.json').read_text())
    assert len(ledger) == s['lines'] == s['kept'] + s['dropped']
    r = subprocess.run([*base, '--out', str(tmp_path / 'x'), '--address', 'auto'], capture_output=True, text=True)
    assert r.returncode == 2 and '--address is for the ray executor' in r.stderr


def test_result_does_not_depend_on_partitions(shards, runs, tmp_path):
    "One hash partition, or more partitions than shards: the same files as one partition per shard."
    for parts in (1, 7):
        r = curate(shards, tmp_path / f'p{parts}', CurateConfig(workers=1, partitions=parts), quality_model=None,
                   progress=False)
        assert _files(r.out_dir) == _files(runs[0].out_dir)
        assert r.summary['dedup']['partitions'] == parts


@pytest.fixture(scope='module')
def originals():
    "Sample documents that pass the default rules, to copy and edit."
    from xgen_small.data.curate import default_filters
    from xgen_small.data.sample import load_sample
    chain = default_filters()
    return [d for d in load_sample() if d['domain'] in ('prose', 'web') and chain(d['text'], d['domain']) is None][:40]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_sharded_dedup_is_the_one_process_dedup(tmp_path_factory, originals, data):
    """Random corpora of originals, exact copies and edited copies spread over random shards, deduplicated over a
    random number of hash partitions: stage 3's decision equals `dedup_in_memory`'s (notebook 04's FuzzyDedup)."""
    picked = data.draw(st.lists(st.sampled_from(originals), min_size=1, max_size=5))
    docs = []
    for _ in range(data.draw(st.integers(2, 24))):
        o = data.draw(st.sampled_from(picked))
        w = o['text'].split(' ')
        for _ in range(data.draw(st.sampled_from([0, 0, 1, 3, 10, 40]))):   # exact copies, near copies, far ones
            w[data.draw(st.integers(0, len(w) - 1))] = data.draw(st.sampled_from(('river', 'stone', 'the', 'cloud')))
        docs.append(dict(domain=o['domain'], text=' '.join(w)))
    n_shards, parts = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5))
    d = tmp_path_factory.mktemp('h')
    shard_of = [data.draw(st.integers(0, n_shards - 1)) for _ in docs]
    paths = [d / f'{i}.jsonl' for i in range(n_shards)]
    for i, p in enumerate(paths):
        mine = [json.dumps(dict(id=f'd{k}', **doc)) + '\n' for k, (doc, s) in enumerate(zip(docs, shard_of)) if s == i]
        p.write_text(''.join(mine))
    cfg = CurateConfig(workers=1, partitions=parts)
    r = curate(paths, d / 'out', cfg, quality_model=None, progress=False, keep_work=True)
    work = r.out_dir / 'work'
    sharded = resolve_duplicates(work, n_shards, parts)
    assert sharded == dedup_in_memory(survivors(work, n_shards), cfg)
    assert r.summary['kept'] + r.summary['dropped'] == len(docs)
    assert r.summary['dedup']['exact_dropped'] + r.summary['dedup']['fuzzy_dropped'] == len(sharded[0])
