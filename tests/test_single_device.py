"""The mesh notebooks on one device, as a single-chip Colab runtime (one TPU v5e, one GPU) or a plain CPU runs them:
every mesh collapses to one device and every cell still runs and asserts (CI's other runs simulate 8 devices)."""
import os
import subprocess
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parents[1] / 'nbs'


@pytest.mark.parametrize('name', ['13_sharding', '14_seqpar'])
def test_mesh_notebook_runs_on_one_device(name):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    r = subprocess.run(['nbdev_test', '--path', str(NBS / f'{name}.ipynb')], env=env, capture_output=True, text=True,
                       timeout=600, cwd=NBS.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
