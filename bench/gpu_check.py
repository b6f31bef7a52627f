"""The one device check of issue 16, to run as is where a GPU is lent (about 5 minutes on one GPU; `--quick`: about 2).

1. The whole default study on the bundled organism, on CPU and on the GPU: every circuit identical, every number in
   every result file equal to 1e-4 (prompts, circuits and their scores, drop tables, circuit-on-other-task table).
2. A GPT-2-small-size random model on the GPU (random weights: a model-labelled task, the model's own top-2 as answer
   and wrong answer; 24-token prompts): knockout (one pass over all 156 heads and MLPs, both engines) and path
   patching (the 25 nodes of the published GPT-2 small numerals circuit) timed, with peak GPU memory against the
   cost model's figures (`seqcircuits.cost.knockout_bytes`, `seqcircuits.patching.patching_cache_bytes`).
3. The FLOP rate those runs sustained, against the rate the README's time estimates assume (`seqcircuits.cost.GPU_TFLOPS`).

Prints a table for the README and writes everything to `--out` (JSON). Exit status 1 if CUDA and CPU disagree.

    python bench/gpu_check.py --out $OUT/gpu_check.json        # where a GPU is lent
    python bench/gpu_check.py --device cpu --quick --tiny       # a dry run of the script itself on CPU
"""
from __future__ import annotations
import argparse, json, math, sys, tempfile, time, warnings
from pathlib import Path

import pandas as pd
import torch

warnings.filterwarnings('ignore', category=DeprecationWarning)
from seqcircuits.core import Circuit
from seqcircuits.model import random_model, gpt2_small_config, config_fingerprint, available_memory, all_nodes
from seqcircuits.data import model_labelled_prompts
from seqcircuits.study import StudySettings, run_study
from seqcircuits.report import STAGES
from seqcircuits.knockout import find_circuit
from seqcircuits.patching import patching_runs, patching_cache_bytes, find_edges
from seqcircuits.ablation import compute_ablation
from seqcircuits.cost import knockout_bytes, forward_bytes, block_flops, planned_circuit, GPU_TFLOPS

PUBLISHED_NUMERALS = ('0.1 1.5 4.4 4.10 5.0 6.1 6.6 6.10 7.11 8.1 8.6 8.8 8.9 9.1 '
                      'MLP0 MLP1 MLP2 MLP3 MLP4 MLP6 MLP7 MLP8 MLP9 MLP10 MLP11')


def sync(device):
    if str(device).startswith('cuda'): torch.cuda.synchronize()


def timed(fn, device):
    sync(device); t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def peak_during(fn, device):
    "Run `fn`; its result, seconds, and the peak GPU memory it allocated above what was allocated before (None on CPU)."
    if not str(device).startswith('cuda'):
        out, s = timed(fn, device); return out, s, None
    torch.cuda.synchronize(); torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    out, s = timed(fn, device)
    return out, s, torch.cuda.max_memory_allocated() - base


def study_files(out: Path) -> dict:
    "Every result file of a study except timings and images: JSON parsed, CSVs as DataFrames, the rest as text."
    res = {}
    for p in sorted(out.rglob('*')):
        if p.is_dir() or p.suffix in ('.png', '.svg') or p.name in ('index.html', 'versions.json', 'settings.json'): continue
        rel = str(p.relative_to(out))
        if p.suffix == '.csv': res[rel] = pd.read_csv(p)
        elif p.suffix == '.json':
            d = json.loads(p.read_text())
            if p.name == 'done.json': d.pop('seconds', None)
            res[rel] = d
        else: res[rel] = p.read_text()
    return res


def max_diff(a, b, path='') -> tuple[float, list]:
    "Largest absolute difference between two nested results, and the places where non-numbers differ."
    if isinstance(a, pd.DataFrame):
        if list(a.columns) != list(b.columns) or a.shape != b.shape: return math.inf, [f'{path}: table shape']
        num = a.select_dtypes('number').columns
        d = float((a[num] - b[num]).abs().max().max()) if len(num) else 0.0
        other = [c for c in a.columns if c not in num and not a[c].equals(b[c])]
        return d, [f'{path}: column {c}' for c in other]
    if isinstance(a, dict):
        if set(a) != set(b): return math.inf, [f'{path}: keys {sorted(set(a) ^ set(b))[:5]}']
        worst, bad = 0.0, []
        for k in a:
            d, b2 = max_diff(a[k], b[k], f'{path}/{k}'); worst, bad = max(worst, d), bad + b2
        return worst, bad
    if isinstance(a, list):
        if len(a) != len(b): return math.inf, [f'{path}: length']
        worst, bad = 0.0, []
        for i, (x, y) in enumerate(zip(a, b)):
            d, b2 = max_diff(x, y, f'{path}[{i}]'); worst, bad = max(worst, d), bad + b2
        return worst, bad
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)), []
    return (0.0, []) if a == b else (0.0, [f'{path}: {str(a)[:60]!r} != {str(b)[:60]!r}'])


def organism_study(device: str, quick: bool) -> dict:
    "The default study on the organism on CPU and on `device`; how far apart their results are."
    settings = dict(n_prompts=384) if quick else {}
    res, secs = {}, {}
    for dev in ('cpu', device):
        with tempfile.TemporaryDirectory() as d:
            _, s = timed(lambda: run_study(StudySettings(device=dev, **settings), d, STAGES, progress=False), dev)
            res[dev], secs[dev] = study_files(Path(d)), s
    if device == 'cpu': return {'seconds_cpu': secs['cpu'], 'max_abs_diff': 0.0, 'mismatches': [], 'same_circuits': True}
    diff, bad = max_diff(res['cpu'], res[device])
    circ = {k: (v['nodes'], v.get('edges')) for k, v in res['cpu'].items() if k.endswith('circuit.json')}
    circ2 = {k: (v['nodes'], v.get('edges')) for k, v in res[device].items() if k.endswith('circuit.json')}
    same = {k: (v[0] == circ2[k][0]) and ([(e['sender'], e['receiver'], e['channel']) for e in v[1] or []] ==
                                          [(e['sender'], e['receiver'], e['channel']) for e in circ2[k][1] or []])
            for k, v in circ.items()}
    return {'seconds_cpu': secs['cpu'], f'seconds_{device}': secs[device], 'max_abs_diff': diff, 'mismatches': bad[:20],
            'same_circuits': all(same.values()), 'files_compared': len(res['cpu'])}


def gpt2_size(device: str, quick: bool, tiny: bool = False) -> dict:
    "Knockout and path patching on a GPT-2-small-size random model: times, peak memory against the cost model, FLOP rates."
    cfg = gpt2_small_config(n_ctx=64, device=device, **(dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256) if tiny else {}))
    model = random_model(cfg, seed=0)
    n_knock, n_patch, n_pos = (128, 64, 24) if quick else (512, 256, 24)
    g = torch.Generator().manual_seed(0)
    clean, corrupted = [torch.randint(0, cfg.d_vocab, (n_knock, n_pos), generator=g) for _ in range(2)]
    corrupted[:, :2] = clean[:, :2]  # clean and corrupted share a prefix, as templated prompts do
    ps = model_labelled_prompts(model, clean, corrupted)
    abl = compute_ablation(model, ps, 'mean')
    out = {'n_prompts_knockout': n_knock, 'n_prompts_patching': n_patch, 'n_pos': n_pos}
    attn, mlp = block_flops(cfg, n_pos)
    forward = n_pos * cfg.n_layers * (attn + mlp) + 2 * cfg.d_model * cfg.d_vocab_out
    for engine in ('fast', 'hooks'):
        c, s, peak = peak_during(lambda: find_circuit(model, ps, ablation=abl, engine=engine, max_passes=1, progress=False), device)
        n = c.meta['n_scored']
        out[f'knockout_{engine}'] = {'seconds': s, 'candidates': n, 'seconds_per_candidate': s / n, 'peak_bytes': peak,
                                     'circuit': c.summary()}
        if engine == 'fast':  # what the cost model counts for the fast engine: half a forward per candidate, two to start
            flops = n_knock * (3 * forward + n * forward / 2)
            out['knockout_fast'].update(predicted_bytes=knockout_bytes(cfg, n_knock, n_pos) + forward_bytes(cfg, n_knock, n_pos),
                                        tflops_sustained=flops / s / 1e12)
    circuit = planned_circuit(cfg) if tiny else Circuit.from_names(PUBLISHED_NUMERALS, config_hash=config_fingerprint(cfg))
    sub = ps[:n_patch]
    out['patching_nodes'] = len(circuit)
    runs, s, peak = peak_during(lambda: patching_runs(model, sub, circuit, ablation=abl.take(slice(0, n_patch))), device)
    out['patching_runs'] = {'seconds': s, 'peak_bytes': peak, 'predicted_cache_bytes': patching_cache_bytes(model, sub, circuit)}
    held = sum(t.numel() * t.element_size() for d in (runs.resid, runs.mid, runs.delta, runs.clean_heads, runs.prefix)
               for t in d.values())
    out['patching_runs']['held_bytes'] = held
    del runs
    e, s, peak = peak_during(lambda: find_edges(model, sub, circuit, ablation=abl.take(slice(0, n_patch)), progress=False,
                                                faithfulness=False), device)
    out['find_edges'] = {'seconds': s, 'peak_bytes': peak, 'edges': len(e.edges), 'nodes': len(e.nodes)}
    out['free_bytes_after'] = available_memory(device)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cuda')
    ap.add_argument('--quick', action='store_true', help='smaller study and prompt sets')
    ap.add_argument('--out', default='gpu_check.json')
    ap.add_argument('--tiny', action='store_true', help='a 2-layer model instead of GPT-2 size (a dry run of the script on CPU)')
    a = ap.parse_args(argv)
    if a.device.startswith('cuda') and not torch.cuda.is_available():
        print('gpu_check: no CUDA GPU here; run it where one is lent (or --device cpu for a dry run).', file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    env = {'torch': torch.__version__, 'device': a.device, 'quick': a.quick}
    if a.device.startswith('cuda'):
        p = torch.cuda.get_device_properties(torch.device(a.device))
        env.update(gpu=p.name, total_bytes=p.total_memory, free_bytes=available_memory(a.device),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    print(json.dumps(env), flush=True)
    t0 = time.perf_counter()
    res = {'env': env, 'organism_study': organism_study(a.device, a.quick)}
    print('organism study:', json.dumps(res['organism_study'])[:600], flush=True)
    res['gpt2_size'] = gpt2_size(a.device, a.quick, a.tiny)
    res['seconds_total'] = time.perf_counter() - t0
    Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    g, o = res['gpt2_size'], res['organism_study']
    gib = lambda b: 'n/a' if b is None else f"{b / 2**30:.2f} GiB"
    print(f"\n| measure ({env.get('gpu', a.device)}) | value |\n|---|---|")
    print(f"| organism study, CPU vs {a.device}: max abs difference, same circuits | {o['max_abs_diff']:.1e}, {o['same_circuits']} |")
    print(f"| organism study seconds: CPU / {a.device} | {o['seconds_cpu']:.1f} / {o.get(f'seconds_{a.device}', o['seconds_cpu']):.1f} |")
    for e in ('fast', 'hooks'):
        k = g[f'knockout_{e}']
        print(f"| GPT-2-size knockout, {e} engine, {g['n_prompts_knockout']} prompts: s per candidate, peak | "
              f"{k['seconds_per_candidate']:.3f} s, {gib(k['peak_bytes'])} |")
    print(f"| knockout cost model: predicted peak, sustained TFLOPS (README assumes {GPU_TFLOPS}) | "
          f"{gib(g['knockout_fast']['predicted_bytes'])}, {g['knockout_fast']['tflops_sustained']:.1f} |")
    pr = g['patching_runs']
    print(f"| path patching cache, {g['n_prompts_patching']} prompts, {g['patching_nodes']} nodes: patching_cache_bytes / held / peak | "
          f"{gib(pr['predicted_cache_bytes'])} / {gib(pr['held_bytes'])} / {gib(pr['peak_bytes'])} |")
    print(f"| find_edges, {g['patching_nodes']} nodes, {g['n_prompts_patching']} prompts: seconds, peak | {g['find_edges']['seconds']:.1f} s, "
          f"{gib(g['find_edges']['peak_bytes'])} |")
    print(f"\nwritten {a.out} ({res['seconds_total']:.0f} s)")
    ok = o['same_circuits'] and o['max_abs_diff'] <= 1e-4 and not o['mismatches']
    if not ok: print(f"gpu_check: CPU and {a.device} disagree: {o['mismatches'][:5]}, max diff {o['max_abs_diff']:.2e}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
