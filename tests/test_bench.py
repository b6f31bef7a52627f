"""The benchmark scripts in `bench/` are not run by the tests (their timings need a quiet machine), but they must
keep importing what the package exports: each script's top level (its imports and constants, not its `__main__`
part) runs here, all in one process."""
import subprocess, sys
from pathlib import Path

BENCH = sorted((Path(__file__).resolve().parents[1]/'bench').glob('*.py'))

def test_bench_scripts_import():
    assert {p.name for p in BENCH} >= {'bench_knockout.py', 'bench_patching.py', 'bench_baselines.py', 'gpu_check.py'}
    code = ("import runpy, sys\n"
            "for p in sys.argv[1:]:\n"
            "    g = runpy.run_path(p, run_name='bench_import_check')\n"
            "    print(p, len(g))\n")
    r = subprocess.run([sys.executable, '-c', code, *map(str, BENCH)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.splitlines()) == len(BENCH)
