"""Smoke runs of the benchmark scripts, so they cannot rot (their numbers are not asserted here)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / 'benchmarks'


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f'{name}.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def test_decode_benchmark_quick():
    rows = _load('decode').main(['--quick'])
    assert rows and all(r['ours'] > 0 and r['hf'] > 0 for r in rows)
    assert all(r['same'] == 1.0 for r in rows)  # greedy decoding agrees with transformers token for token


def test_dedup_benchmark_quick():
    # a fresh interpreter: datatrove forks worker processes, which is unsafe once JAX's threads exist
    r = subprocess.run(
        [sys.executable, str(BENCH / 'dedup.py'), '--quick', '--json'], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    rows = {row['system']: row for row in json.loads(r.stdout.strip().splitlines()[-1])}
    ours, theirs = rows['ours, verified >= 0.7 (14x8)'], rows['datatrove, numbers kept']
    assert ours['f1_jaccard'] >= theirs['f1_jaccard'] - 0.02     # at least parity in quality


def test_loader_benchmark_quick():
    r = _load('loader').main(['--quick'])
    assert r['loader'] > 10 * r['model']        # loading must never be what a training step waits for


def test_attention_benchmark_quick():
    rows = _load('attention').main(['--quick'])
    assert {r['impl'] for r in rows} == {'xla', 'blockwise', 'flash', 'splash'}
    assert all('step_s' in r and r['peak_rss_mib'] > 0 for r in rows)


def test_train_benchmark_quick():
    rows = _load('train').main(['--quick'])
    assert rows and all(
        r['ours'] > 0 and r['hf'] > 0 and 0 < r['mfu'] <= 1 for r in rows
    )  # a fraction of the measured peak


def test_tokenizer_benchmark_quick():
    rows = _load('tokenizer').main(['--quick'])
    ours = [r for r in rows if r['system'].startswith('ours')]
    assert len(ours) == 2 and all(
        r['same_ids'] == 1.0 and r['round_trip'] == 1.0 for r in ours
    )  # the wrapper changes no ids
    assert all(r['mb_s'] > 0 for r in rows)


def test_retrieval_probe_quick(tmp_path):
    mod = _load('retrieval_probe')
    out = mod.main(['--quick', '--data', 'recall', '--seq', '128', '--rows', '4', '--save', str(tmp_path / 'p')])
    assert [r['step'] for r in out['log']] == [2, 4] and all(
        np.isfinite(r['loss']) and 0 <= r['answer_acc'] <= 1 for r in out['log']
    )
    assert set(out['passkey']) == {256, 512, 1024}
    # parameters round-trip
    again = mod.main(['--quick', '--data', 'niah', '--rows', '2', '--init', str(tmp_path / 'p')])
    assert len(again['log']) == 2


def test_code_reward_benchmark_quick():
    rows = _load('code_reward').main(['--quick'])
    assert {r['sandbox'] for r in rows} == {'bwrap', 'none'} and all(r['right'] and r['rewards_s'] > 0 for r in rows)


def test_prefill_benchmark_quick():
    rows = _load('prefill').main(['--quick'])
    assert all(r['same'] is True for r in rows)                       # the path changes the memory, not the answer
    assert rows[-1]['chunked_gib'] < rows[-1]['reference_gib']


def test_seqpar_memory_benchmark_quick():
    rows = _load('seqpar_memory').main(['--quick'])
    short, long, spread = rows
    assert long['ring'] < 6 * short['ring']                            # 4x the tokens per device: linear, not 16x
    assert spread['ring'] < long['ring']                               # more devices on the sequence: less each
    assert long['xla'] > 10 * long['ring']                             # the plain layer's [T, T] scores


def test_curation_benchmark_quick():
    "Ours (rules + dedup) and datatrove's pipeline on a quarter of the sample: both run and report."
    r = subprocess.run(
        [sys.executable, str(BENCH / 'curation.py'), '--quick', '--systems', 'ours-rules+dedup,datatrove', '--json'],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stderr
    rows = {row['system']: row for row in json.loads(r.stdout.strip().splitlines()[-1])}
    assert set(rows) == {'ours-rules+dedup', 'datatrove'}
    assert all(row['docs_per_s'] > 0 and 0 < row['kept'] <= row['documents'] for row in rows.values())
