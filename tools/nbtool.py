"""Notebook chores for xgen_small developers and CI.

    python tools/nbtool.py sync [NB...]      # .py (percent) -> .ipynb, keeping outputs (jupytext --sync)
    python tools/nbtool.py run NB...         # execute notebooks in place (outputs of a CPU run), then clean
    python tools/nbtool.py check-pairs       # fail when an .ipynb and its .py disagree (CI)
    python tools/nbtool.py toc [--check]     # the notebook table in nbs/index.py and mkdocs.yml's nav, from the numbers
    python tools/nbtool.py readme [--check]  # README.md from nbs/index.ipynb (quarto-free nbdev_readme)
    python tools/nbtool.py command main|test # print one of README's two commands (CI runs the test one)
    python tools/nbtool.py docs              # the documentation site in docs/ (mkdocs; pip install -e ".[docs]")
    python tools/nbtool.py slow [--no-benchmarks]   # the slow suite: nbdev_test --flags slow, then every benchmark

Notebooks are executed with 8 host CPU devices, as in CI, so multi-device examples show real meshes.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'
XLA_FLAGS = '--xla_force_host_platform_device_count=8'


def _notebooks(names):
    if not names: return sorted(NBS.glob('*.ipynb'))
    return [Path(n) if Path(n).exists() else NBS / n for n in names]


def _cells(nb):
    "(cell_type, source) pairs: what a notebook and its paired script must agree on."
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def check_pairs() -> int:
    import jupytext
    bad = []
    ipynbs = {p.stem for p in NBS.glob('*.ipynb')}
    scripts = {p.stem for p in NBS.glob('*.py')}
    for stem in sorted(ipynbs ^ scripts): bad.append(f'{stem}: one side of the pair is missing')
    for stem in sorted(ipynbs & scripts):
        a, b = jupytext.read(NBS / f'{stem}.ipynb'), jupytext.read(NBS / f'{stem}.py')
        if _cells(a) != _cells(b): bad.append(f'{stem}: .ipynb and .py disagree (run: python tools/nbtool.py sync)')
    for line in bad: print('check-pairs:', line, file=sys.stderr)
    if not bad: print(f'check-pairs: {len(ipynbs)} notebook pairs agree')
    return 1 if bad else 0


def sync(names) -> int:
    scripts = [NBS / (Path(n).stem + '.py') for n in names] if names else sorted(NBS.glob('*.py'))
    return subprocess.call(['jupytext', '--sync', *map(str, scripts)])


def run(names) -> int:
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS)
    for nb in _notebooks(names):
        print(f'executing {nb.name}', flush=True)
        code = ('import re\nfrom execnb.shell import CaptureShell\n'
                'skip = lambda c: bool(re.search(r"^#\\|\\s*eval:\\s*false", c.source, re.M))  # as nbdev_test does\n'
                f'sh = CaptureShell(); sh.execute({str(nb)!r}, {str(nb)!r}, exc_stop=True, preproc=skip)')
        if subprocess.call([sys.executable, '-c', code], env=env, cwd=NBS): return 1
    return subprocess.call(['nbdev_clean'], cwd=ROOT)


def _output_text(o):
    if o.get('output_type') == 'stream': return ''.join(o['text'])
    data = o.get('data', {})
    if 'text/markdown' in data: return None  # rendered inline below
    if 'text/plain' in data and not any(k.startswith('image/') for k in data): return ''.join(data['text/plain'])
    return ''


def readme_text() -> str:
    nb = json.loads((NBS / 'index.ipynb').read_text())
    parts = []
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'markdown': parts.append(src.strip()); continue
        if re.search(r'^#\|\s*(hide|exporti?)\b', src, re.M): continue
        code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
        if code: parts.append(f'```python\n{code}\n```')
        for o in c.get('outputs', []):
            if o.get('output_type') == 'display_data' or o.get('output_type') == 'execute_result':
                md = o.get('data', {}).get('text/markdown')
                if md: parts.append(''.join(md).strip()); continue
            txt = _output_text(o)
            if txt and txt.strip(): parts.append(f'```\n{txt.rstrip()}\n```')
    return ('<!-- Generated from nbs/index.ipynb by tools/nbtool.py readme; edit the notebook, not this file. -->\n\n'
            + '\n\n'.join(parts) + '\n')


# Reading order is the notebooks' numbers; these ranges name the parts of the docs navigation and the README table.
SECTIONS = ((0, 9, 'Configs and data'), (10, 16, 'Model'), (17, 18, 'Training'), (19, 20, 'Long context'),
            (21, 29, 'Post-training'), (30, 99, 'Evaluation and the whole run'))


def notebook_index() -> list[dict]:
    "Every numbered notebook: number, stem, title (its H1), summary (its `>` line) and module (its default_exp)."
    out = []
    for p in sorted(NBS.glob('[0-9][0-9]_*.py')):
        text = p.read_text()
        title = re.search(r'^# # (.+)$', text, re.M)
        summary = re.search(r'^# > (.+)$', text, re.M)
        module = re.search(r'^#\|\s*default_exp\s+(\S+)', text, re.M)
        if not (title and summary and module):
            raise SystemExit(f'{p.name}: needs an H1 title, a > summary and a default_exp')
        out.append(
            dict(
                number=int(p.name[:2]),
                stem=p.stem,
                title=title.group(1).strip(),
                summary=summary.group(1).strip(),
                module=module.group(1),
            )
        )
    return out


def _section(n: int) -> str:
    return next(name for lo, hi, name in SECTIONS if lo <= n <= hi)


def toc_markdown() -> list[str]:
    lines, current = [], None
    for nb in notebook_index():
        if _section(nb['number']) != current:
            current = _section(nb['number'])
            lines += ([''] if lines else []) + [
                f'**{current}**',
                '',
                '| notebook | module | what it holds |',
                '|---|---|---|',
            ]
        lines.append(f"| [{nb['stem']}](nbs/{nb['stem']}.ipynb) | `{nb['module']}` | {nb['summary']} |")
    return lines


def toc_nav() -> list[str]:
    lines, current = ['nav:', '  - Home: index.ipynb'], None
    for nb in notebook_index():
        if _section(nb['number']) != current:
            current = _section(nb['number']); lines.append(f'  - {current}:')
        lines.append(f"      - \"{nb['number']:02d} {nb['title']}\": {nb['stem']}.ipynb")
    return lines


def _replace_between(text: str, start: str, end: str, body: list[str], prefix: str = '') -> str:
    i, j = text.index(start), text.index(end)
    return text[:i + len(start)] + '\n' + ''.join(f'{prefix}{l}'.rstrip() + '\n' for l in body) + text[j:]


def toc(check: bool) -> int:
    "Write (or, with `check`, compare) the notebook table of nbs/index.py and the nav of mkdocs.yml."
    targets = [(NBS / 'index.py', '# <!-- notebooks:start -->', '# <!-- notebooks:end -->', toc_markdown(), '# '),
               (ROOT / 'mkdocs.yml', '# nav:start', '# nav:end', toc_nav(), '')]
    stale = []
    for path, start, end, body, prefix in targets:
        old = path.read_text(); new = _replace_between(old, start, end, body, prefix)
        if new != old:
            stale.append(path.name)
            if not check: path.write_text(new)
    if check and stale:
        print(
            f'not generated from the notebook numbers: {stale} (run: python tools/nbtool.py toc, then sync)',
            file=sys.stderr,
        )
        return 1
    print('toc: ' + ('up to date' if not stale else f'wrote {stale}'))
    return 0


def readme(check: bool) -> int:
    path, new = ROOT / 'README.md', readme_text()
    if check:
        if not path.exists() or path.read_text() != new:
            print(
                'README.md is not up to date with nbs/index.ipynb (run: python tools/nbtool.py readme)', file=sys.stderr
            )
            return 1
        print('README.md matches nbs/index.ipynb'); return 0
    path.write_text(new); print('wrote README.md'); return 0


def command(which: str) -> str:
    "The shell command in README's fenced block that follows the `<!-- command: which -->` marker."
    text = (ROOT / 'README.md').read_text()
    m = re.search(rf'<!-- command: {which} -->\s*```(?:sh|bash)?\n(.+?)\n```', text, re.S)
    if not m: raise SystemExit(f'README.md has no "<!-- command: {which} -->" block')
    return m.group(1).strip()


# The benchmarks' full runs in the slow suite (minutes each on 2 cores). long_context_demo.py (~35 min) and
# retrieval_probe.py are experiments rather than checks; run them by hand when their stages change.
SLOW_BENCHMARKS = ('code_reward', 'loader', 'tokenizer', 'dedup', 'decode', 'train', 'attention')


def slow(benchmarks: bool = True) -> int:
    "Every notebook with its `#| slow` cells (nbdev_test --flags slow), then each benchmark's full run; a summary."
    import time
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS)
    steps = [('nbdev_test --flags slow', ['nbdev_test', '--flags', 'slow', '--timing'])]
    if benchmarks:
        steps += [
            (f'benchmarks/{b}.py', [sys.executable, str(ROOT / 'benchmarks' / f'{b}.py')]) for b in SLOW_BENCHMARKS
        ]
    results = []
    for name, cmd in steps:
        print(f'== {name}', flush=True)
        t0 = time.time(); rc = subprocess.call(cmd, cwd=ROOT, env=env)
        results.append((name, rc, time.time() - t0))
    print('\nslow suite:')
    for name, rc, dt in results: print(f"  {'ok  ' if rc == 0 else 'FAIL'} {name} ({dt:.0f} s)")
    return 1 if any(rc for _, rc, _ in results) else 0


DOCS_SRC = ROOT / '_docs_src'


def docs_sources() -> Path:
    "Notebooks as readers should see them: `#| hide` and `#| eval: false` cells dropped, `#|` directive lines removed."
    import shutil
    if DOCS_SRC.exists(): shutil.rmtree(DOCS_SRC)
    DOCS_SRC.mkdir()
    for nb_path in sorted(NBS.glob('*.ipynb')):
        nb = json.loads(nb_path.read_text())
        cells = []
        for c in nb['cells']:
            src = ''.join(c['source'])
            if c['cell_type'] == 'code':
                if re.search(r'^#\|\s*(hide|eval:\s*false)\b', src, re.M): continue
                src = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip('\n')
                if not src.strip() and not c.get('outputs'): continue
                c = dict(c, source=src)
            cells.append(c)
        (DOCS_SRC / nb_path.name).write_text(json.dumps(dict(nb, cells=cells), indent=1))
    shutil.copytree(ROOT / 'tools' / 'docs_assets', DOCS_SRC / 'assets')
    return DOCS_SRC


def docs() -> int:
    docs_sources()
    return subprocess.call(
        [
            sys.executable,
            '-m',
            'mkdocs',
            'build',
            '--strict' if '--strict' in sys.argv else '--clean',
            '-f',
            str(ROOT / 'mkdocs.yml'),
        ],
        cwd=ROOT,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    sub.add_parser('check-pairs')
    s = sub.add_parser('sync'); s.add_argument('names', nargs='*')
    r = sub.add_parser('run'); r.add_argument('names', nargs='*')
    t = sub.add_parser('toc'); t.add_argument('--check', action='store_true')
    m = sub.add_parser('readme'); m.add_argument('--check', action='store_true')
    c = sub.add_parser('command'); c.add_argument('which', choices=['main', 'test'])
    sub.add_parser('docs')
    sl = sub.add_parser('slow'); sl.add_argument('--no-benchmarks', action='store_true')
    a = p.parse_args(argv)
    if a.cmd == 'check-pairs': return check_pairs()
    if a.cmd == 'sync': return sync(a.names)
    if a.cmd == 'run': return run(a.names)
    if a.cmd == 'toc': return toc(a.check)
    if a.cmd == 'readme': return readme(a.check)
    if a.cmd == 'command': print(command(a.which)); return 0
    if a.cmd == 'docs': return docs()
    if a.cmd == 'slow': return slow(not a.no_benchmarks)


if __name__ == '__main__':
    sys.exit(main())
