"""The `xgen-small` console script, run as a user would run it."""
import subprocess


def _run(*args):
    return subprocess.run(['xgen-small', *args], capture_output=True, text=True, timeout=300)


def test_demo_runs_and_reports_speed():
    r = _run('demo', '--batch', '2', '--max-new-tokens', '6')
    assert r.returncode == 0, r.stderr
    assert 'tokens/s' in r.stdout and r.stdout.count('prompt (') == 2


def test_bad_override_is_a_clear_error():
    r = _run('demo', '--set', 'n_heads=3')
    assert r.returncode == 2
    assert 'n_kv_heads' in r.stderr and 'Traceback' not in r.stderr
    r = _run('demo', '--set', 'no_such_field=1')
    assert r.returncode == 2 and "no field 'no_such_field'" in r.stderr


def test_presets_lists_parameter_counts():
    r = _run('presets')
    assert r.returncode == 0 and 'xgen_9b' in r.stdout and '8,925,777,920' in r.stdout
