"""End-to-end: the `seqcircuits run` command on the bundled organism, including an interrupted and resumed run."""
import json, os, signal, subprocess, sys, time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'MPLBACKEND': 'Agg', 'PYTHONUNBUFFERED': '1'}
# Small but complete: two tasks, all stages.
ARGS = ['run', '--tasks', 'numerals', 'months', '--templates', 'born', 'lost', 'done', '--n-prompts', '384', '--quiet']


def cli(*args, **kw):
    return subprocess.run([sys.executable, '-m', 'seqcircuits.cli', *args], env=ENV, capture_output=True, text=True, **kw)


def results(out: Path) -> dict:
    "Every result file of a study except timings, as text (done.json minus seconds)."
    res = {}
    for p in sorted(out.rglob('*')):
        if p.is_dir() or p.suffix in ('.png', '.svg') or p.name in ('index.html', 'versions.json'): continue
        rel = str(p.relative_to(out))
        if p.name == 'done.json':
            d = json.loads(p.read_text()); d.pop('seconds'); res[rel] = d
        else: res[rel] = p.read_text()
    return res


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('full')
    r = cli(*ARGS, '--out', str(out))
    assert r.returncode == 0, r.stderr
    return out, r


@pytest.mark.slow  # a whole study through the command line
def test_report_contents(full_run):
    out, r = full_run
    assert 'Report:' in r.stdout and str(out) in r.stdout
    html = (out/'index.html').read_text()
    for text in ('Circuit on other task', 'Task: numerals', 'Task: months', 'removed from the full model',
                 'removed from the circuit', 'Time per stage', 'transformer_lens', 'MLP analysis', 'Logit lens',
                 'Direct logit attribution', 'MLPs removed from the full model', 'Where the answer appears'):
        assert text in html, text
    for f in ('_all/compare/circuits.png', '_all/compare/circuits.svg', 'numerals/edges/graph.png', 'months/drops/drops_from_full.png',
              'numerals/mlps/kinds.png', 'months/lens/lens.png', 'months/dla/dla.svg', '_all/lens_tasks/first_correct.png'):
        assert (out/f).stat().st_size > 1000, f
    on_other = pd.read_csv(out/'_all/compare/circuit_on_other_task.csv', index_col=0)
    assert list(on_other.index) == ['numerals', 'months'] and list(on_other.columns) == ['numerals', 'months', 'shared core', 'random']
    # each task's own circuit keeps at least the threshold on its own data (the knockout's promise)
    for t in ('numerals', 'months'):
        assert on_other.loc[t, t] >= 80.0 - 1e-6, on_other
        c = json.loads((out/t/'knockout'/'circuit.json').read_text())
        assert abs(100 * c['score'] - on_other.loc[t, t]) < 0.01


@pytest.mark.slow  # a whole study through the command line
def test_resume_after_kill_gives_same_results(full_run, tmp_path):
    out_full, _ = full_run
    out = tmp_path/'killed'
    p = subprocess.Popen([sys.executable, '-m', 'seqcircuits.cli', *ARGS, '--out', str(out)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out/'numerals'/'knockout'/'done.json'
    t0 = time.time()
    while not marker.exists() and p.poll() is None and time.time() - t0 < 300: time.sleep(0.05)
    assert p.poll() is None, 'the run finished before it could be killed'
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (out/'_all'/'compare'/'done.json').exists()
    r = cli(*ARGS, '--out', str(out), timeout=600)
    assert r.returncode == 0, r.stderr
    assert results(out) == results(out_full)
    # a third run finds everything done and recomputes nothing: no stage function is called
    from seqcircuits.study import StudySettings, run_study
    from seqcircuits.report import STAGES
    def never(study, task, folder): raise AssertionError(f'a finished stage was recomputed ({folder})')
    settings = StudySettings.from_dict(json.loads((out/'settings.json').read_text()))
    run_study(settings, out, [replace(s, run=never) for s in STAGES], progress=False)
    assert results(out) == results(out_full)


@pytest.mark.slow  # a whole study through the command line
def test_other_settings_same_dir_is_an_error(full_run):
    out, _ = full_run
    r = cli(*ARGS[:-1], '--threshold', '0.7', '--out', str(out))
    assert r.returncode == 2 and 'other settings' in r.stderr and 'overwrite' in r.stderr, r.stderr


def test_too_little_memory_for_path_patching(tmp_path, monkeypatch, capsys):
    "Path patching that cannot fit even one prompt stops at once with one clear line; knockout's result is kept."
    import seqcircuits.patching as P
    from seqcircuits.cli import main
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(P, 'available_memory', lambda device: 100)  # bytes free
    rc = main(['run', '--tasks', 'numerals', '--templates', 'done', '--n-prompts', '128', '--quiet', '--out', str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count('\n') == 1, err
    assert 'Path patching would cache' in err and 'Not even one prompt fits' in err, err
    assert (tmp_path/'numerals'/'knockout'/'done.json').exists() and not (tmp_path/'numerals'/'edges'/'done.json').exists()
