"""The notebooks that build meshes or read the device count, on one device, as a single-chip Colab runtime (one TPU
v5e, one GPU) or a plain CPU runs them: every mesh collapses to one device and every cell still runs and asserts
(CI's other runs simulate 8 devices). The other notebooks never ask how many devices there are (no mesh, no
`device_count`; `test_no_other_notebook_depends_on_the_device_count` keeps that true), so one run covers them."""
import os
import subprocess
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parents[1] / 'nbs'


MESH_NOTEBOOKS = ['13_sharding', '14_seqpar', '16_hf', '17_checkpoint', '18_train', '20_long_context', '22_posttrain',
                  '30_eval', '39_report', '40_pipeline', '41_cli', '45_full_scale']


def test_no_other_notebook_depends_on_the_device_count():
    words = ('make_mesh', 'MeshConfig', 'device_count', 'jax.devices', 'xla_force_host_platform_device_count')
    users = {p.stem for p in NBS.glob('[0-9]*.py') if any(w in p.read_text() for w in words)}
    assert users <= set(MESH_NOTEBOOKS), sorted(users - set(MESH_NOTEBOOKS))


@pytest.mark.parametrize('name', MESH_NOTEBOOKS)
def test_mesh_notebook_runs_on_one_device(name):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    r = subprocess.run(['nbdev_test', '--path', str(NBS / f'{name}.ipynb')], env=env, capture_output=True, text=True,
                       timeout=600, cwd=NBS.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
