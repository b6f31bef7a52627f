"""Execute notebooks the way `nbdev_test` does (cells flagged `#| eval: false` or with a test flag such as `hub` are
skipped) and save them with their outputs, so the rendered docs show figures and tables without running GPT-2.

`jupyter nbconvert --execute` cannot do this: it does not read nbdev's flags, so it stops at the first GPT-2 cell.
Skipped cells are saved without outputs.

Run: `python .ci/save_outputs.py nbs/09_path_patching.ipynb [...]`, then `nbdev_clean`.
"""
import os, sys
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory
from nbdev.config import get_config
from nbdev.process import extract_directives


def save_outputs(fn: Path, flags: set[str]) -> None:
    "Run notebook `fn` skipping what `nbdev_test` skips; write its outputs into the file. Raises on a failing cell."
    nb = read_nb(fn)
    for cell in nb.cells:  # execnb keeps a cell's old outputs when it prints nothing now
        if cell.cell_type == 'code': cell.outputs, cell.execution_count = [], None
    def skip(cell):
        if cell.cell_type != 'code': return True
        d = extract_directives(cell, remove=False)  # the `#|` lines, left in the source
        return d.get('eval:', [''])[0].lower() == 'false' or bool(flags & d.keys())
    shell = CaptureShell(fn)
    # we pin TransformerLens 3.x on purpose (see constraints.txt): its notice about 4.0 is noise on every docs page
    shell.run("import warnings; warnings.filterwarnings('ignore', message='HookedTransformer is deprecated')")
    with working_directory(fn.parent): shell.run_all(nb, exc_stop=True, preproc=skip)
    for cell in nb.cells:  # progress bars (stderr text redrawn with carriage returns) are no output worth keeping
        if cell.cell_type == 'code':
            cell.outputs = [o for o in cell.outputs if not (o.get('name') == 'stderr' and '\r' in ''.join(o.get('text', '')))]
    write_nb(nb, fn)


if __name__ == '__main__':
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    skip_flags = set(get_config().get('tst_flags', '').split())
    for f in sys.argv[1:]:
        save_outputs(Path(f).resolve(), skip_flags)
        print(f'saved with outputs: {f}')
