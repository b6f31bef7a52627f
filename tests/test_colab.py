"""Every notebook opens on Colab from its badge and installs seqcircuits there, and only there (.ci/colab_cells.py)."""
import subprocess, sys, types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'.ci'))
import colab_cells


def test_every_notebook_has_its_badge_and_install_cell():
    r = subprocess.run([sys.executable, str(ROOT/'.ci'/'colab_cells.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_install_cell_does_nothing_off_colab(monkeypatch):
    monkeypatch.delitem(sys.modules, 'google.colab', raising=False)
    calls = []
    exec(colab_cells.install_source(), {'get_ipython': lambda: types.SimpleNamespace(run_line_magic=lambda *a: calls.append(a))})
    assert calls == []


def test_install_cell_installs_on_colab(monkeypatch):
    monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('google.colab'))
    calls = []
    exec(colab_cells.install_source(), {'get_ipython': lambda: types.SimpleNamespace(run_line_magic=lambda *a: calls.append(a))})
    assert calls == [('pip', 'install -q "seqcircuits @ git+https://github.com/seqcircuits/seqcircuits@main"')]


def test_script_is_idempotent_and_repairs(tmp_path):
    "A notebook without badge or install cell gets both; a second run changes nothing; a stale cell is replaced."
    import json
    nb = {'cells': [colab_cells._cell('code', '#| default_exp x'), colab_cells._cell('markdown', '# X\n> what x does'),
                    colab_cells._cell('code', '#| export\nimport seqcircuits')], 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}
    p = ROOT/'nbs'/'_test_colab_tmp.ipynb'  # the badge points into nbs/, so the file must live there
    try:
        p.write_text(json.dumps(nb))
        assert colab_cells.main([str(p)]) == 0
        once = p.read_text()
        assert colab_cells.main(['--check', str(p)]) == 0
        assert colab_cells.main([str(p)]) == 0 and p.read_text() == once
        cells = json.loads(once)['cells']
        assert 'nbs/_test_colab_tmp.ipynb' in ''.join(cells[2]['source']) and colab_cells.MARK in ''.join(cells[3]['source'])
        stale = json.loads(once); stale['cells'][3]['source'] = [colab_cells.MARK + ' (old)\n']
        p.write_text(json.dumps(stale))
        assert colab_cells.main(['--check', str(p)]) == 1
        colab_cells.main([str(p)])
        assert colab_cells.main(['--check', str(p)]) == 0
    finally:
        p.unlink(missing_ok=True)
