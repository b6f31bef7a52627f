"""Give every notebook its "Open in Colab" badge and its Colab install cell. Idempotent: run it again whenever
notebooks are added or renamed (it only writes notebooks it changes).

- The badge links to the notebook itself on Colab (repository and branch from settings.ini). A notebook without one
  gets a markdown cell holding it right after its title cell; a badge pointing at another notebook (a copied or
  renamed one) is repointed.
- The install cell is the first code cell after the badge's cell, before any code that imports seqcircuits. On Colab
  (where `google.colab` is imported) it installs seqcircuits from the repository; elsewhere (locally, under
  nbdev_test, in CI) it does nothing. It is hidden from the docs. A stale copy (another text under the same first
  line) is replaced.

Run:   python .ci/colab_cells.py [NOTEBOOK ...]     (default: every notebook in nbs/), then nbdev_clean
Check: python .ci/colab_cells.py --check [...]      (exit 1, listing each problem; the tests run this check)
"""
import configparser, json, re, sys, uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = '# Colab: install seqcircuits'  # the install cell's first line after its directive


def settings() -> dict:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT/'settings.ini')
    return dict(cfg['DEFAULT'])


def install_source() -> str:
    s = settings()
    repo = s['git_url'].rstrip('/')
    return (f"#| hide\n"
            f"{MARK} when this notebook runs on Colab; elsewhere this cell does nothing.\n"
            f"# GPT-2 cells use the GPU when the runtime has one (Runtime > Change runtime type > T4 GPU).\n"
            f"import sys\n"
            f"if 'google.colab' in sys.modules:\n"
            f"    get_ipython().run_line_magic('pip', 'install -q \"{s['lib_name']} @ git+{repo}@{s.get('branch', 'main')}\"')")


def badge(nb_path: Path) -> str:
    s = settings()
    user_repo = s['git_url'].rstrip('/').split('github.com/')[-1]
    rel = nb_path.resolve().relative_to(ROOT).as_posix()
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{user_repo}/blob/{s.get('branch', 'main')}/{rel})")


BADGE_RE = re.compile(r'\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]\([^)]*\)')


def _src(cell) -> str:
    s = cell.get('source', '')
    return ''.join(s) if isinstance(s, list) else s


def _lines(text: str) -> list:
    ls = text.split('\n')
    return [l + '\n' for l in ls[:-1]] + ([ls[-1]] if ls[-1] else [])


def _cell(kind: str, text: str) -> dict:
    c = {'cell_type': kind, 'id': uuid.uuid4().hex[:8], 'metadata': {}, 'source': _lines(text)}
    if kind == 'code': c.update(execution_count=None, outputs=[])
    return c


def problems(nb_path: Path, nb: dict) -> list:
    "What the notebook lacks: its own badge, the install cell (current text, right after the badge, before other code)."
    cells, out = nb['cells'], []
    want = badge(nb_path)
    at = next((i for i, c in enumerate(cells) if c['cell_type'] == 'markdown' and BADGE_RE.search(_src(c))), None)
    if at is None: return ['no Colab badge']
    if want not in _src(cells[at]): out.append(f'the Colab badge does not point at this notebook ({want})')
    inst = [i for i, c in enumerate(cells) if c['cell_type'] == 'code' and MARK in _src(c)]
    if not inst: return out + ['no Colab install cell']
    if len(inst) > 1: out.append('more than one Colab install cell')
    i = inst[0]
    if _src(cells[i]) != install_source(): out.append('the Colab install cell is out of date')
    first_code = next((j for j, c in enumerate(cells) if c['cell_type'] == 'code' and j > at), None)
    if i < at or first_code != i: out.append('the Colab install cell is not the first code cell after the badge')
    return out


def fix(nb_path: Path, nb: dict) -> bool:
    "Add or update the badge and the install cell; True if the notebook changed."
    before = json.dumps(nb, sort_keys=True)
    cells = nb['cells']
    for i in [i for i, c in enumerate(cells) if c['cell_type'] == 'code' and MARK in _src(c)][::-1]: del cells[i]
    at = next((i for i, c in enumerate(cells) if c['cell_type'] == 'markdown' and BADGE_RE.search(_src(c))), None)
    if at is None:
        title = next((i for i, c in enumerate(cells) if c['cell_type'] == 'markdown' and _src(c).lstrip().startswith('# ')), None)
        at = 0 if title is None else title + 1
        cells.insert(at, _cell('markdown', badge(nb_path)))
    else:
        cells[at]['source'] = _lines(BADGE_RE.sub(lambda m: badge(nb_path), _src(cells[at]), count=1))
    cells.insert(at + 1, _cell('code', install_source()))
    if json.dumps(nb, sort_keys=True) == before: return False
    return True


def main(argv: list) -> int:
    check = '--check' in argv
    paths = [Path(a) for a in argv if a != '--check'] or sorted((ROOT/'nbs').glob('*.ipynb'))
    bad = 0
    for p in paths:
        nb = json.loads(p.read_text())
        if check:
            for msg in problems(p, nb):
                print(f"{p.relative_to(ROOT) if p.is_absolute() else p}: {msg}"); bad += 1
            continue
        if problems(p, nb):
            fix(p, nb)
            p.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
            print(f"updated {p}")
    if check and bad: print("Run `python .ci/colab_cells.py && nbdev_clean` to fix.")
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
