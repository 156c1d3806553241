"""Wrap the statements that run past the line limit, one statement at a time, with `ruff format` (development aid).

    python tools/wrap_long.py FILE...        # notebooks' percent scripts (exported cells only) or plain modules

Formatting a whole file would restyle every line; this touches only a statement (or a compound statement's header)
that has a line longer than the limit, so the dense, deliberate layout of the rest stays as written. Strings and
comments that are too long are reported, for a person to rewrite.
"""
import ast
import io
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

LIMIT = 120


def _ruff_format(src: str, width: int = LIMIT) -> str | None:
    r = subprocess.run(
        ['ruff', 'format', '--line-length', str(width), '--config', 'format.quote-style="preserve"', '-'],
        input=src,
        capture_output=True,
        text=True,
    )
    return r.stdout if r.returncode == 0 else None


def _spans(tree, lines):
    "(start, end, header_only) line spans (0-based, inclusive) of the innermost statements with an over-long line."
    long = {i for i, l in enumerate(lines) if len(l) > LIMIT}
    found = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt): continue
        start = (node.decorator_list[0].lineno if getattr(node, 'decorator_list', None) else node.lineno) - 1
        end = node.end_lineno - 1
        body = getattr(node, 'body', None)
        header_end = end
        if isinstance(body, list) and body and body[0].lineno - 1 > node.lineno - 1:
            header_end = body[0].lineno - 2           # a compound statement whose body starts on a later line
        for i in long:
            if node.lineno - 1 <= i <= header_end or (start <= i < node.lineno - 1):
                span = (start, header_end, header_end != end)
                prev = found.get(i)
                if prev is None or span[1] - span[0] < prev[1] - prev[0]: found[i] = span
    return sorted(set(found.values()), reverse=True)


def wrap(src: str) -> str:
    try: tree = ast.parse(src)
    except SyntaxError: return src
    lines = src.split('\n')
    for start, end, header in _spans(tree, lines):
        chunk = '\n'.join(lines[start:end + 1])
        indent = len(chunk) - len(chunk.lstrip(' '))
        body = textwrap.dedent(chunk)
        if header: body += '\n    pass'
        out = _ruff_format(body + '\n', LIMIT - indent)
        if out is None: continue
        out = out.rstrip('\n')
        if header:
            if not out.endswith('pass'): continue
            out = out[:out.rindex('\n')]
        new = textwrap.indent(out, ' ' * indent)
        lines[start:end + 1] = new.split('\n')
    return '\n'.join(lines)


def wrap_comments(src: str) -> str:
    "Long comments: a trailing one moves above its line; a comment line is re-wrapped at the same indent."
    try: toks = [t for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT]
    except (tokenize.TokenError, SyntaxError, IndentationError): return src
    lines = src.split('\n')
    for t in reversed(toks):
        i, col = t.start[0] - 1, t.start[1]
        line = lines[i]
        if len(line) <= LIMIT or t.string.startswith('#|'): continue
        code = line[:col].rstrip()
        indent = len(line) - len(line.lstrip(' '))
        text = t.string.lstrip('#').strip()
        wrapped = textwrap.wrap(text, LIMIT - indent - 2, break_long_words=False, break_on_hyphens=False)
        block = [' ' * indent + '# ' + w for w in wrapped]
        lines[i:i + 1] = block + ([code] if code.strip() else [])
    return '\n'.join(lines)


def wrap_percent_script(text: str) -> str:
    "Exported code cells of a jupytext percent script."
    parts = text.split('\n# %%')
    out = [parts[0]]
    for p in parts[1:]:
        head, _, code = p.partition('\n')
        if head.strip() == '' and code.startswith('#| export'):
            code = wrap_comments(wrap(code))
        out.append(head + '\n' + code)
    return '\n# %%'.join(out)


if __name__ == '__main__':
    for name in sys.argv[1:]:
        p = Path(name); text = p.read_text()
        new = wrap_percent_script(text) if p.parent.name == 'nbs' else wrap_comments(wrap(text))
        if new != text: p.write_text(new); print('wrapped', p)
        for i, l in enumerate(new.split('\n'), 1):
            if len(l) > LIMIT: print(f'{p}:{i}: still {len(l)} columns: {l.strip()[:70]}')
