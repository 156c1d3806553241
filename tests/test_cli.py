"""The `xgen-small` console script, run as a user would run it."""
import subprocess

import pytest


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
    assert r.returncode == 2 and "no config field 'no_such_field'" in r.stderr


def test_presets_lists_parameter_counts():
    r = _run('presets')
    assert r.returncode == 0 and 'xgen_9b' in r.stdout and '8,925,777,920' in r.stdout


def test_run_dry_run_prints_the_plan():
    r = _run('run', '--preset', 'xgen_4b', '--dry-run')
    assert r.returncode == 0, r.stderr
    assert '| pretrain | 1,907,348 |' in r.stdout and 'extend/overlength' in r.stdout and 'mesh on' in r.stdout


def test_run_stops_resumes_and_refuses_another_config(tmp_path):
    out = str(tmp_path / 'run')
    quick = ['--set', 'quality_model=none', '--out', out, '--no-progress']
    r = _run('run', *quick, '--stop-after', 'tokenizer')
    assert r.returncode == 0, r.stderr
    assert '[2/9] tokenizer: finished' in r.stdout and 'pretrain' not in r.stdout
    r = _run('run', *quick, '--status')
    assert r.returncode == 0 and '    curate: done' in r.stdout and '  pretrain: todo' in r.stdout
    r = _run('run', *quick, '--stop-after', 'tokenizer')                    # nothing left to do up to there
    assert r.returncode == 0 and r.stdout.count('skipped') == 2
    r = _run(
        'run',
        *quick,
        '--set',
        'vocab_size=2048',
        '--set',
        'pretrain.model.vocab_size=2048',
        '--stop-after',
        'tokenizer',
    )
    assert (
        r.returncode == 2
        and "different configuration of stage 'tokenizer'" in r.stderr
        and '--redo tokenizer' in r.stderr
    )
    assert 'Traceback' not in r.stderr


def test_run_bad_input_is_a_clear_error(tmp_path, capsys):
    from xgen_small.cli import main  # in-process: these fail before any work, so skip the start-up cost
    def err(*args):
        assert main(['run', '--out', str(tmp_path / 'x'), *args]) == 2
        e = capsys.readouterr().err
        assert 'Traceback' not in e
        return e
    assert "no config field 'rl.stepz'" in err('--set', 'rl.stepz=3')
    assert 'must equal vocab_size' in err('--set', 'vocab_size=1000')
    assert 'not found' in err('--inputs', str(tmp_path / 'missing.jsonl'))
    bad = tmp_path / 'cfg.json'; bad.write_text('{"pretrain": ')
    assert 'not valid JSON' in err('--config', str(bad))
    with pytest.raises(SystemExit) as e:                 # stage names come from the pipeline's table: argparse checks
        main(['run', '--out', str(tmp_path / 'x'), '--stop-after', 'ship'])
    assert e.value.code == 2 and "invalid choice: 'ship'" in capsys.readouterr().err
    assert "give a JSON object" in err('--set', 'sft_shares=math')
    assert not (tmp_path / 'x').exists()             # nothing was written


def test_eval_and_chat_take_a_hugging_face_checkpoint(tmp_path):
    "A Llama-format checkpoint with its own tokenizer and chat template, built here: `--hf DIR` is all it takes."
    from hf_files import write_tiny_checkpoint
    from transformers import AutoTokenizer

    from xgen_small.hf import load_hf_checkpoint
    from xgen_small.posttrain import chat
    from xgen_small.tokenizer import load_tokenizer, render_chat
    d = write_tiny_checkpoint(tmp_path / 'ckpt')
    model = load_hf_checkpoint(d)
    r = _run('eval', '--hf', str(d), '--tasks', 'niah_single', '--lengths', '256', '--n', '2')
    assert r.returncode == 0, r.stderr
    assert 'niah_single' in r.stdout
    r = _run('chat', '--hf', str(d), '--message', 'What is 6 * 7?', '--max-new-tokens', '5')
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(d)
    assert r.stdout.splitlines()[1] == chat(model, tok, ['What is 6 * 7?'], 5)[0]    # the same reply as in Python
    msgs = [dict(role='user', content='What is 6 * 7?')]
    assert render_chat(tok, msgs, add_generation_prompt=True).ids == list(
        AutoTokenizer.from_pretrained(d).apply_chat_template(msgs, add_generation_prompt=True)['input_ids'])
    r = _run('eval', '--run', str(d), '--tasks', 'niah_single')
    assert r.returncode == 2 and 'needs --tokenizer' in r.stderr
    r = _run('chat', '--message', 'hi')
    assert r.returncode == 2 and 'one of the arguments --run --hf is required' in r.stderr


def test_lm_eval_runs_the_harness_on_our_model(tmp_path):
    "`xgen-small lm-eval` is the harness' own command line, with `--model xgen_small` registered; a local task."
    import json

    from hf_files import write_tiny_checkpoint
    d = write_tiny_checkpoint(tmp_path / 'ckpt')
    rows = [dict(q=f'{a} plus {b} is', choices=[str(a + b), str(a * b + 1)], label=0) for a, b in ((2, 3), (4, 5))]
    (tmp_path / 'sums.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (tmp_path / 'sums.yaml').write_text(
        f"task: sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'sums.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: label\nmetric_list:\n  - metric: acc\n')
    r = _run('lm-eval', '--model', 'xgen_small', '--model_args', f'path={d}', '--tasks', 'sums',
             '--include_path', str(tmp_path), '--batch_size', '2', '--output_path', str(tmp_path / 'out'))
    assert r.returncode == 0, r.stderr[-2000:]
    assert '|sums' in r.stdout and 'acc' in r.stdout, r.stdout
    assert list((tmp_path / 'out').rglob('results_*.json'))
