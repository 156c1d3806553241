"""A hostile battery for the code reward (notebook 21): completions written to forge a reward, read what they must not,
damage the host or outlive their sandbox. Each must score 0 (or exactly its honest share) and leave no trace."""
import json
import os
import socket
import subprocess
import threading
import time
import uuid

import pytest

from xgen_small import tasks
from xgen_small.tasks import SandboxUnavailable, code_reward, run_tests, sandbox_mode

TESTS = ['add_k(1) == 4', 'add_k(-3) == 0', 'add_k(10) == 13']
GOOD = 'def add_k(x):\n    return x + 3\n'


def run(code, tests, timeout=5.0):
    # never run this battery outside the sandbox: unsandboxed, as root, it deletes and kills what it aims at
    if tasks.sandbox_mode() != 'bwrap': pytest.fail('the hostile battery runs only inside bubblewrap')
    return run_tests(code, tests, timeout=timeout)


def reward(code, tests=TESTS, timeout=5.0):
    r = run(code, tests, timeout=timeout)
    assert 0 <= r['passed'] <= r['total'] == len(tests)
    return r['passed'] / r['total']


def survivors(marker):
    "Processes whose command line carries `marker` (pgrep exits 1 when there are none)."
    return subprocess.run(['pgrep', '-f', marker], capture_output=True, text=True).stdout.split()


def test_the_sandbox_is_bubblewrap_here():
    assert sandbox_mode() == 'bwrap'          # CI and developers run the battery inside the real sandbox
    assert reward(GOOD) == 1.0 and reward(GOOD.replace('+ 3', '+ 4')) == 0.0


# -- forging the verdict ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    'code',
    [
        'print(\'{"passed": 49}\')',  # the old harness' format
        'print(\'{"values": ["true", "true", "true"]}\', flush=True); import os; os._exit(0)',  # a line of guesses
        'import sys, os\nprint(\'{"values": ["4", "0"]}\', flush=True); os._exit(0)',  # the wrong length
        'print("[" * 200000, flush=True); import os; os._exit(0)',  # a parser bomb for the parent
        'import sys\nsys.stdout.close()\ndef add_k(x): return -1',  # silence the real result
    ],
)
def test_forged_results_earn_nothing(code):
    assert reward(code) == 0.0


def test_a_silenced_stdout_does_not_hide_an_honest_result():
    assert reward('import sys, os\nsys.stdout = None\nos.close(1)\n' + GOOD) == 1.0


def test_the_sandbox_never_sees_the_expected_values(monkeypatch):
    # everything the child can read about its own job: its command line, stdin, the harness' objects, returned as the
    # value of the test expression; the parent holds the expected value, a fresh secret
    code = ('import sys, gc\n'
            'seen = open("/proc/self/cmdline", "rb").read().decode(errors="replace") + repr(sys.argv)\n'
            'seen += repr([o for o in gc.get_objects() if isinstance(o, (dict, list, str))][:20000])\n'
            'def leak(): return seen\n')
    secret = 'secret-' + uuid.uuid4().hex
    seen, harness = [], tasks._run_harness

    def spy(argv, job, timeout):
        status, values = harness(argv, job, timeout)
        seen.append((argv, job, values))
        return status, values
    monkeypatch.setattr(tasks, '_run_harness', spy)
    r = run(code, [{'expr': 'leak()', 'expected': secret}], timeout=5)
    (argv, job, values), = seen
    assert r['passed'] == 0 and 'leak()' in json.loads(values[0])      # the child read its own job...
    assert secret not in json.dumps([argv, job, values])                # ...which never held the answer


@pytest.mark.parametrize('code', [
    'class Eq:\n    def __eq__(self, o): return True\n    def __hash__(self): return 0\ndef add_k(x): return Eq()',
    'class Eq(int):\n    def __eq__(self, o): return True\ndef add_k(x): return Eq(7)',      # serialises as 7
    'class S(str):\n    def __eq__(self, o): return True\ndef add_k(x): return S("4")',       # a string is not an int
    'def add_k(x): return float(x + 3)',                                                      # 4.0 is not 4
    'def add_k(x): return [x + 3]',
    'import json\njson.dumps = lambda *a, **k: "4"\ndef add_k(x): return None',             # patch the child's json
])
def test_objects_that_claim_equality_fail(code):
    assert reward(code) == 0.0


def test_honest_share_and_bounds():
    assert reward('def add_k(x): return 4 if x == 1 else 0') == pytest.approx(2 / 3)      # right on 1 and -3
    assert reward(GOOD, TESTS + ['add_k(0) == 5']) == 0.75


# -- reading and writing the host ------------------------------------------------------------------------------------

def test_the_parents_files_environment_and_memory_are_out_of_reach(tmp_path, monkeypatch):
    answer = 918_273_645
    (tmp_path / 'answer.txt').write_text(str(answer))
    monkeypatch.setenv('XGEN_SECRET_ANSWER', str(answer))
    code = f'''
import os, glob, re
found = []
def grab(path):
    try: found.extend(re.findall(rb"\\d{{9}}", open(path, "rb").read()))
    except Exception: pass
grab({str(tmp_path / 'answer.txt')!r})
for p in glob.glob("/proc/*/environ") + glob.glob("/proc/*/cmdline"): grab(p)
found += [v.encode() for v in os.environ.values() if v.isdigit()]
def add_k(x): return int(found[0]) if found else -1
'''
    assert run(code, [f'add_k(0) == {answer}'])['passed'] == 0
    assert run(code.replace('def add_k(x): return int(found[0]) if found else -1', 'def add_k(x): return len(found)'),
                     ['add_k(0) == 0'])['passed'] == 1                   # nothing with nine digits was found at all
    for p in (__file__, str(tmp_path / 'answer.txt'), '/etc/passwd', os.path.expanduser('~/.bashrc')):
        assert reward(f'import os\nok = os.path.exists({p!r})\ndef add_k(x): return 0 if ok else x + 3') == 1.0, p


def test_writes_and_deletes_outside_are_refused(tmp_path):
    victim = tmp_path / 'checkpoint'
    victim.write_text('weights')
    tree = tmp_path / 'run' / 'checkpoints'
    tree.mkdir(parents=True); (tree / 'step_10').write_text('weights')
    marker = 'xgen-sandbox-' + uuid.uuid4().hex
    code = f'''
import os, shutil
for f in ({str(victim)!r},):
    try: os.remove(f)
    except Exception: pass
for d in ({str(tmp_path)!r}, "/tmp", os.path.expanduser("~"), "/usr", "/usr/lib", "/var/tmp", "/dev/shm"):
    try: open(os.path.join(d, {marker!r}), "w").write("x")
    except Exception: pass
try: shutil.rmtree({str(tree)!r})
except Exception: pass
'''
    assert reward(code + GOOD) == 1.0               # the honest part of the completion still works
    assert victim.read_text() == 'weights' and (tree / 'step_10').read_text() == 'weights'
    hits = subprocess.run(['find', '/tmp', '/var/tmp', '/dev/shm', os.path.expanduser('~'), '/usr', str(tmp_path),
                           '-maxdepth', '2', '-name', marker], capture_output=True, text=True).stdout
    assert hits == ''


def test_network_is_unreachable():
    server = socket.socket()
    server.bind(('127.0.0.1', 0)); server.listen(5); server.settimeout(0.2)
    port, accepted, stop = server.getsockname()[1], [], threading.Event()

    def listen():
        while not stop.is_set():
            try: conn, _ = server.accept()
            except OSError: continue
            accepted.append(1); conn.sendall(b'3'); conn.close()
    t = threading.Thread(target=listen, daemon=True)
    t.start()
    try:
        # the listener would hand out the answer's offset; a completion that reaches it scores 1
        code = (f'import socket\nK = int(socket.create_connection(("127.0.0.1", {port}), timeout=1).recv(8))\n'
                'def add_k(x): return x + K')
        assert reward(code) == 0.0
        # and the listener itself works: the same connection from this process is accepted
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        time.sleep(0.5)
    finally:
        stop.set(); t.join(); server.close()
    assert accepted == [1]


# -- processes, floods and limits ------------------------------------------------------------------------------------

@pytest.mark.parametrize('tail', ['', 'while True: pass'])
def test_nothing_outlives_the_sandbox(tail):
    marker = f'{60 + int(uuid.uuid4().int % 1000) / 1000:.3f}'
    code = (
        'import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0: os.execv("/bin/sleep", ["sleep", '
        f'"{marker}"])\n'
        f'    os._exit(0)\n{GOOD}{tail}\n'
    )
    expected = 1.0 if not tail else 0.0                # exits normally (honest share) or is killed at the timeout
    assert reward(code, timeout=1.5 if tail else 10.0) == expected
    time.sleep(0.2)
    assert survivors(f'sleep {marker}') == []


def test_fork_bomb_is_contained():
    t0 = time.perf_counter()
    assert reward('import os\nwhile True:\n    try: os.fork()\n    except OSError: pass', timeout=2.0) == 0.0
    assert time.perf_counter() - t0 < 10
    assert reward('import os\nn = 0\ntry:\n    while n < 100: os.fork() or os._exit(0); n += 1\nexcept OSError: pass\n'
                  'def add_k(x): return x + 3 if n < 100 else 0') == 1.0   # the process limit stopped it short of 100


def test_a_fork_bomb_does_not_starve_its_neighbours():
    # as root, every run's harness used to become the same `nobody`, whose 16-process limit the kernel counts across
    # all of them: a bomb beside an honest program that forks made the honest one fail (a flaky CI failure)
    from concurrent.futures import ThreadPoolExecutor
    bomb = 'import os, time\nwhile True:\n    try: os.fork()\n    except OSError: time.sleep(0.01)'
    honest = 'import os\nfor _ in range(8):\n    if os.fork() == 0: os._exit(0)\n    os.wait()\n' + GOOD
    with ThreadPoolExecutor(2) as pool:
        bombs = [pool.submit(reward, bomb, timeout=6.0) for _ in range(2)]
        time.sleep(2.0)                                      # both bombs hold all the processes they may
        assert [reward(honest) for _ in range(3)] == [1.0] * 3
        assert [b.result() for b in bombs] == [0.0, 0.0]


@pytest.mark.parametrize('code', [
    'x = bytearray(4 << 30)',
    'xs = []\nwhile True: xs.append(bytearray(1 << 20))',
    'while True: print("x" * 10000)',
    'import sys\nwhile True: sys.stderr.write("y" * 10000)',
    'open("/tmp/big", "wb").write(b"z" * (200 << 20))',
    'for i in range(10000): open(f"/tmp/f{i}", "wb").write(b"z" * (1 << 19))',
    'fs = [open(f"/tmp/o{i}", "w") for i in range(10000)]',
    'import threading, time\nfor _ in range(1000): threading.Thread(target=time.sleep, args=(30,)).start()',
])
def test_floods_end_in_zero(code):
    t0 = time.perf_counter()
    assert reward(code + '\n' + GOOD, timeout=3.0) == 0.0             # stopped before the honest part ever runs
    assert time.perf_counter() - t0 < 10


def test_a_huge_value_is_not_an_answer():
    assert reward('def add_k(x): return "x" * (100 << 20)') == 0.0      # more output than the 1 MB file limit


def test_kill_everything_in_reach():
    # signals to every process it may signal: inside its PID namespace, as nobody, that is only its own
    assert reward('import os, signal\ntry: os.kill(-1, signal.SIGKILL)\nexcept Exception: pass\n' + GOOD) == 1.0
    assert reward(GOOD) == 1.0


# -- refusing to run without a sandbox -------------------------------------------------------------------------------

def test_refuses_without_a_sandbox(monkeypatch):
    monkeypatch.setattr(tasks, '_probe_bwrap', lambda: 'user namespaces are disabled (simulated)')
    monkeypatch.delenv(tasks.SANDBOX_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match='XGEN_SMALL_SANDBOX=none'):
        code_reward(GOOD, TESTS)
    with pytest.raises(SandboxUnavailable):
        tasks.task_rewards([dict(kind='code', prompt=[], tests=TESTS)], [GOOD])
    # math needs none
    assert tasks.task_rewards([dict(kind='math', prompt=[], answer='4')], ['The answer is 4.']) == [1.0]
    monkeypatch.setenv(tasks.SANDBOX_ENV, 'none')                 # the explicit, unsafe opt-in
    assert code_reward(GOOD, TESTS) == 1.0 and code_reward('print(\'{"passed": 3}\')', TESTS) == 0.0
    with pytest.raises(ValueError, match='sandbox must be one of'):
        code_reward(GOOD, TESTS, sandbox='chroot')
