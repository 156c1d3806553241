"""Code-reward throughput: what the sandbox costs. Rewards per second for the same completions and unit tests, run in
bubblewrap (the default) and unsandboxed (`sandbox='none'`: the same harness in a plain subprocess, the reference),
one at a time and with one worker per core (`task_rewards`, as RL's rollouts score them).

    python benchmarks/code_reward.py            # 96 completions per row
    python benchmarks/code_reward.py --quick    # smoke run (used by tests/test_benchmarks.py)

Half the completions are the tasks' reference solutions, half are wrong; every reward is checked against that.
"""
import argparse
import os
import platform
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='8 completions per row')
    ap.add_argument('--n', type=int, default=96)
    a = ap.parse_args(argv)
    from xgen_small.tasks import code_tasks, sandbox_mode, task_rewards

    n = 8 if a.quick else a.n
    tasks = code_tasks(n, seed=0)
    texts = [t['solution'] for t in tasks]
    texts = [t if i % 2 == 0 else t.replace('return', 'return -1 +', 1) for i, t in enumerate(texts)]
    want = [1.0 if i % 2 == 0 else None for i in range(n)]
    cores = os.cpu_count() or 1
    print(f'code-reward benchmark: {n} completions, {len(tasks[0]["tests"])}+ tests each; '
          f'{platform.processor() or platform.machine()}, {cores} CPUs, uid {os.getuid()}')
    print(f"{'sandbox':>8} {'workers':>7} | {'rewards/s':>9} {'ms/reward':>9} | right")
    rows = []
    for sandbox in ('bwrap', 'none'):
        if sandbox == 'bwrap': sandbox_mode('bwrap')            # refuses clearly where bubblewrap cannot run
        for workers in (1, cores):
            task_rewards(tasks[:2], texts[:2], sandbox=sandbox, workers=workers)      # warm up
            t0 = time.perf_counter()
            r = task_rewards(tasks, texts, sandbox=sandbox, workers=workers)
            dt = time.perf_counter() - t0
            right = all((w is None and x < 1) or x == w for x, w in zip(r, want))
            rows.append(dict(sandbox=sandbox, workers=workers, rewards_s=n / dt, right=right))
            print(f'{sandbox:>8} {workers:>7} | {n / dt:>9.1f} {1000 * dt / n:>9.1f} | {right}')
    return rows


if __name__ == '__main__':
    main()
