"""mkdocs hooks for the notebook site: links written for GitHub (`nbs/NN_name.ipynb`, `benchmarks/...`) are rewritten
to the site's own pages, or to the repository, so the README and the site can share one index notebook."""
import re

REPO = 'https://github.com/xgen-small/xgen_small/blob/main/'


def on_page_content(html, page, config, files):
    depth = page.url.count('/')                      # 'index' -> 0, '23_sft/' -> 1
    up = '../' * depth
    html = re.sub(
        r'href="(?:nbs/)?(\w+)\.ipynb"', lambda m: f'href="{up}{"" if m[1] == "index" else m[1] + "/"}"', html
    )
    html = re.sub(r'href="((?:benchmarks|tests|tools|xgen_small)/[^"]*)"', lambda m: f'href="{REPO}{m[1]}"', html)
    return html
