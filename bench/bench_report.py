"""Benchmark: the full default report (`seqcircuits run`, bundled organism, default settings), stage by stage.

Runs the whole study (`seqcircuits.report.STAGES`, then the HTML report) in a fresh process and prints each stage's
CPU seconds (user + sys of the process, all threads, `time.process_time`) and wall seconds, the total, and the ratio
to the 120 s target of issues 12 and 13 ("well under 2 minutes on 2 cores"). CPU seconds are what to compare on a
shared machine: wall seconds there depend on what else runs.

With `--ref REF` (a git commit, branch or tag, e.g. `main`), the same study also runs on that commit's `seqcircuits`
(exported with `git archive` into a temporary folder, run with the same Python and settings), in the same conditions,
and the script prints the ratio old / new per stage and in total, then checks that both runs wrote the same results:
every CSV and JSON of the two study folders compared, numbers to a relative tolerance (`--rtol`), apart from the
records of time (`done.json`'s seconds, the report's time table).

    python bench/bench_report.py                   # this checkout only: per-stage CPU and wall seconds, total, vs 120 s
    python bench/bench_report.py --ref main        # and main's code, with ratios and a check that the results agree
    OMP_NUM_THREADS=1 python bench/bench_report.py --ref main   # one thread (the least noisy on a loaded machine)
"""
from __future__ import annotations
import argparse, json, math, os, resource, subprocess, sys, tempfile, time
from pathlib import Path

TARGET = 120.0  # seconds on 2 cores (issues 12 and 13)
ROOT = Path(__file__).resolve().parents[1]

# --- the inner run: one study in this process, each stage timed (CPU and wall)
def _inner(out: str, timings: str, n_prompts: int | None):
    import dataclasses, warnings
    warnings.filterwarnings('ignore')
    c0, w0 = time.process_time(), time.perf_counter()
    import seqcircuits
    from seqcircuits.study import StudySettings, run_study
    from seqcircuits.report import STAGES, write_report
    rows = []
    def timed(stage):
        def run(study, task, folder):
            c, w = time.process_time(), time.perf_counter()
            got = stage.run(study, task, folder)
            rows.append({'stage': stage.name, 'task': task or 'all', 'cpu': time.process_time() - c, 'wall': time.perf_counter() - w})
            return got
        return dataclasses.replace(stage, run=run)
    settings = StudySettings() if n_prompts is None else StudySettings(n_prompts=n_prompts)
    c1 = time.process_time()
    run_study(settings, out, [timed(s) for s in STAGES], progress=False, after=write_report)
    rows.append({'stage': '(import, model load, report)', 'task': 'all', 'cpu': time.process_time() - c0 - sum(r['cpu'] for r in rows),
                 'wall': time.perf_counter() - w0 - sum(r['wall'] for r in rows)})
    Path(timings).write_text(json.dumps({'rows': rows, 'cpu': time.process_time() - c0, 'wall': time.perf_counter() - w0,
                                         'package': str(Path(seqcircuits.__file__).parent)}))

def _run(src: Path, out: Path, n_prompts: int | None) -> dict:
    "One study in a fresh process on the `seqcircuits` in `src`; its timings, with the child's user and sys CPU."
    t = out.with_suffix('.json')
    env = os.environ | {'PYTHONPATH': str(src), 'HF_HUB_OFFLINE': '1'}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, __file__, '--inner', str(out), str(t)] + ([] if n_prompts is None else ['--n-prompts', str(n_prompts)])
    subprocess.run(cmd, env=env, check=True, cwd=tempfile.gettempdir())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    got = json.loads(t.read_text())
    got['user'], got['sys'] = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    if Path(got['package']).resolve() != (src/'seqcircuits').resolve():
        raise RuntimeError(f"the run imported seqcircuits from {got['package']}, not from {src}")
    return got

# --- comparing two study folders
_SKIP_KEYS = {'seconds', 'files', 'inputs'}  # times; and checksums of files (their bytes: the numbers are compared instead)

def _same(a, b, rtol: float, where: str, diffs: list):
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b): diffs.append(f"{where}: keys {sorted(set(a) ^ set(b))[:5]} differ"); return
        for k in a:
            if k not in _SKIP_KEYS: _same(a[k], b[k], rtol, f"{where}.{k}", diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b): diffs.append(f"{where}: lengths {len(a)} and {len(b)}"); return
        for i, (x, y) in enumerate(zip(a, b)): _same(x, y, rtol, f"{where}[{i}]", diffs)
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if not (a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=rtol)):
            diffs.append(f"{where}: {a!r} and {b!r}")
    elif a != b: diffs.append(f"{where}: {str(a)[:60]!r} and {str(b)[:60]!r}")

def compare_studies(a: Path, b: Path, rtol: float = 1e-4) -> list[str]:
    "The differences between the CSV and JSON results of two study folders: numbers within `rtol` count as equal; times and checksums are skipped."
    import numpy as np, pandas as pd
    diffs = []
    files = lambda d: {p.relative_to(d).as_posix() for p in d.rglob('*') if p.suffix in ('.csv', '.json') and p.name != 'study.json'
                       and p.name != 'versions.json'}
    fa, fb = files(a), files(b)
    diffs += [f"only in the old run: {f}" for f in sorted(fa - fb)] + [f"only in the new run: {f}" for f in sorted(fb - fa)]
    for f in sorted(fa & fb):
        if f.endswith('.json'):
            _same(json.loads((a/f).read_text()), json.loads((b/f).read_text()), rtol, f, diffs); continue
        x, y = pd.read_csv(a/f, keep_default_na=False), pd.read_csv(b/f, keep_default_na=False)
        if list(x.columns) != list(y.columns) or x.shape != y.shape: diffs.append(f"{f}: columns or shape differ"); continue
        for c in x.columns:
            u, v = pd.to_numeric(x[c], errors='coerce'), pd.to_numeric(y[c], errors='coerce')
            if u.notna().all() and v.notna().all():
                bad = ~np.isclose(u.values.astype(float), v.values.astype(float), rtol=rtol, atol=rtol, equal_nan=True)
            else: bad = (x[c].astype(str) != y[c].astype(str)).values
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                diffs.append(f"{f}: column {c!r}, {int(bad.sum())} rows differ (row {i}: {x[c].iloc[i]!r} and {y[c].iloc[i]!r})")
    return diffs

def _byte_identical(a: Path, b: Path) -> tuple[int, int]:
    "How many of the CSV files of both folders are byte for byte identical, of how many."
    files = sorted(p.relative_to(a) for p in a.rglob('*.csv') if (b/p.relative_to(a)).is_file())
    return sum((a/f).read_bytes() == (b/f).read_bytes() for f in files), len(files)

# --- the report
def _by_stage(t: dict) -> dict:
    out = {}
    for r in t['rows']:
        s = out.setdefault(r['stage'], {'cpu': 0.0, 'wall': 0.0})
        s['cpu'] += r['cpu']; s['wall'] += r['wall']
    return out

def _table(new: dict, old: dict | None) -> str:
    n, o = _by_stage(new), _by_stage(old) if old else {}
    names = list(dict.fromkeys([*n, *o]))
    head = f"{'stage':<30}{'new CPU s':>10}{'new wall s':>11}" + (f"{'old CPU s':>10}{'old wall s':>11}{'old/new CPU':>12}" if old else '')
    lines = [head, '-' * len(head)]
    for s in names:
        a, b = n.get(s, {'cpu': 0.0, 'wall': 0.0}), o.get(s)
        line = f"{s:<30}{a['cpu']:>10.1f}{a['wall']:>11.1f}"
        if old: line += f"{b['cpu']:>10.1f}{b['wall']:>11.1f}{(b['cpu'] / a['cpu'] if a['cpu'] > 0 else float('nan')):>12.2f}" if b else f"{'-':>10}{'-':>11}{'-':>12}"
        lines.append(line)
    tot = lambda t: (t['user'] + t['sys'], t['wall'])
    (cn, wn) = tot(new)
    line = f"{'total (user+sys of the process)':<30}{cn:>10.1f}{wn:>11.1f}"
    if old: co, wo = tot(old); line += f"{co:>10.1f}{wo:>11.1f}{co / cn:>12.2f}"
    return '\n'.join(lines + ['-' * len(head), line])

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--ref', help="also run this git commit's seqcircuits (e.g. main) and compare")
    p.add_argument('--n-prompts', type=int, help='prompts per task (default: the study default, 1536)')
    p.add_argument('--rtol', type=float, default=1e-4, help='relative tolerance when comparing the results')
    p.add_argument('--new-first', action='store_true', help='run this checkout before --ref (to check the order does not favour one)')
    p.add_argument('--keep', help='keep the study folders under this folder (default: a temporary folder, removed)')
    p.add_argument('--inner', nargs=2, metavar=('OUT', 'TIMINGS'), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.inner: return _inner(*a.inner, a.n_prompts)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(a.keep) if a.keep else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, {os.cpu_count()} CPUs; "
              f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
        old = None
        if a.ref:
            src = base/'old_src'
            src.mkdir(exist_ok=True)
            arch = subprocess.run(['git', '-C', str(ROOT), 'archive', a.ref, 'seqcircuits'], check=True, capture_output=True).stdout
            subprocess.run(['tar', '-x', '-C', str(src)], input=arch, check=True)
            print(f"old: {a.ref} ({subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', a.ref], capture_output=True, text=True).stdout.strip()})", flush=True)
        if a.new_first: new = _run(ROOT, base/'new', a.n_prompts)
        if a.ref: old = _run(src, base/'old', a.n_prompts)
        if not a.new_first: new = _run(ROOT, base/'new', a.n_prompts)
        print(f"new: this checkout ({ROOT})\nload average {os.getloadavg()[0]:.1f} at the end\n")
        print(_table(new, old))
        cpu = new['user'] + new['sys']
        print(f"\nnew total: {cpu:.1f} CPU s (user {new['user']:.1f}, sys {new['sys']:.1f}), {new['wall']:.1f} wall s: "
              f"{cpu / TARGET:.2f} x the {TARGET:.0f} s target in CPU seconds, {new['wall'] / TARGET:.2f} x in wall seconds")
        if old:
            co = old['user'] + old['sys']
            print(f"old total: {co:.1f} CPU s, {old['wall']:.1f} wall s; old / new: {co / cpu:.2f} x CPU, {old['wall'] / new['wall']:.2f} x wall")
            diffs = compare_studies(base/'old', base/'new', a.rtol)
            same = _byte_identical(base/'old', base/'new')
            print(f"\nresults: {'the same' if not diffs else f'{len(diffs)} differences'} (every CSV and JSON, rtol {a.rtol:g}); "
                  f"{same[0]} of {same[1]} CSV files byte for byte identical")
            for d in diffs[:40]: print('  ' + d)

if __name__ == '__main__': main()
