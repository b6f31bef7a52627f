"""Benchmark: edge knockout against one pass of edge attribution patching (EAP), and against ACDC at equal faithfulness.

Every side gets the same mean-ablation values, computed once outside the timings (the study computes them once per
task and shares them), and the same node circuit (node knockout's, timed separately and printed).
- One EAP pass: the scorer's full-model forward plus one forward and one backward with TransformerLens hooks
  (`EdgeScorer(..., engine='hooks')` and `.attributions()`), over the node circuit's edges.
- Edge knockout from the node circuit, from scratch (its scorer included): the time to its first faithful circuit (the
  end of its first pass: every accepted removal keeps the threshold) and to convergence (a pass that removes nothing),
  with the default order (receivers from the output back) and ordered by EAP effect; several tries per batched forward.
- ACDC at equal faithfulness (organism): `acdc_at`, the largest tau of a sweep whose circuit keeps 0.8 of the logit
  difference, against edge knockout from every edge of the model at 0.8: time and edges.
Run: `python bench/bench_baselines.py --threads 1` (`--quick`: the organism only, fewer prompts).
"""
import argparse, time
from pathlib import Path

import torch

from seqcircuits.core import Circuit
from seqcircuits.model import organism_dir, load_model, gpt2_small_config, random_model
from seqcircuits.data import model_labelled_prompts, make_prompts, filter_prompts, gpt2_tokenizer
from seqcircuits.ablation import compute_ablation
from seqcircuits.knockout import find_circuit
from seqcircuits.edge_scorer import EdgeScorer
from seqcircuits.baselines import edge_knockout, acdc_at, path_patching

GPT2_FILES = Path(__file__).resolve().parents[1]/'tests'/'data'/'gpt2-tokenizer'  # the repository's copy of GPT-2's tokenizer files


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def eap_pass(model, prompts, nodes, abl):
    sc = EdgeScorer(model, prompts, nodes, ablation=abl, engine='hooks')
    return sc.attributions()


def bench(name, model, prompts, abl, nodes, acdc_too=False, orders=('backward', 'attribution'), spps=(1, 4, 16)):
    print(f"\n{name}: {prompts.n_prompts} prompts x {prompts.n_pos} tokens; node circuit {nodes.summary()}")
    edge_knockout(model, prompts, nodes, ablation=abl, max_passes=1, progress=False)  # warm-up (allocator, caches): not timed
    _, t_eap = timed(lambda: eap_pass(model, prompts, nodes, abl))
    _, t_eap2 = timed(lambda: eap_pass(model, prompts, nodes, abl))
    t_eap = min(t_eap, t_eap2)
    print(f"  one EAP pass (full forward + forward + backward, hooks): {t_eap:.2f} s (best of 2)")
    pp, t_pp = timed(lambda: path_patching(model, prompts, nodes, ablation=abl, progress=False))
    print(f"  path patching: {t_pp:.2f} s, {len(pp.edges)} edges, keeps {pp.score:.3f}  ({t_pp / t_eap:.2f}x EAP)")
    ref = None
    for order in orders:
        for spp in (spps if order == 'backward' else spps[1:2]):
            k, t = timed(lambda: edge_knockout(model, prompts, nodes, ablation=abl, order=order, sets_per_pass=spp, progress=False))
            first = k.meta['pass_times'][0]
            same = '' if ref is None else f"; same circuit as the default order: {k.edges == ref.edges}"
            ref = ref or k
            print(f"  edge knockout, {order} order, {spp} tries/forward: first faithful circuit after {first['seconds']:.2f} s "
                  f"({first['edges']} edges, keeps {first['score']:.3f}) = {first['seconds'] / t_eap:.2f}x EAP; converged after "
                  f"{t:.2f} s ({k.meta['passes']} passes, {len(k.edges)} edges, keeps {k.score:.3f}) = {t / t_eap:.2f}x EAP; "
                  f"{k.meta['sets']} edge sets in {k.meta['forwards']} forwards{same}")
    if acdc_too:
        ka, t_ka = timed(lambda: edge_knockout(model, prompts, None, ablation=abl, progress=False))
        a, t_a = timed(lambda: acdc_at(model, prompts, None, threshold=0.8, ablation=abl, progress=False))
        one = next(s['seconds'] for s in a.meta['sweep'] if s['tau'] == a.meta['tau'])
        print(f"  every edge of the model: edge knockout {t_ka:.2f} s, {len(ka.edges)} edges, keeps {ka.score:.3f}; ACDC at 0.8 "
              f"(tau {a.meta['tau']:g}, reached: {a.meta['reached']}) {len(a.edges)} edges, keeps {a.score:.3f}, the sweep of "
              f"{len(a.meta['sweep'])} taus {t_a:.2f} s ({t_a / t_ka:.2f}x knockout), its one run at that tau {one:.2f} s "
              f"({one / t_ka:.2f}x knockout)")


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--quick', action='store_true', help='the organism only, 64 prompts')
    ap.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument('--gpt2-prompts', type=int, default=16, help='prompts on the GPT-2-size model')
    ap.add_argument('--only', choices=['organism', 'gpt2'], default=None, help='run one of the two models')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if a.only != 'gpt2' and (organism_dir()/'model.safetensors').exists():
        model = load_model()
        ps, _ = filter_prompts(model, make_prompts(model, 'numerals', 'born', n_prompts=256, seed=0))
        ps = ps[:64] if a.quick else ps
        abl = compute_ablation(model, ps)
        nodes, t = timed(lambda: find_circuit(model, ps, ablation=abl, progress=False))
        print(f"organism: node knockout {t:.2f} s")
        bench('organism, numerals "born"', model, ps, abl, nodes, acdc_too=True)
    if not a.quick and a.only != 'organism':
        cfg = gpt2_small_config(n_ctx=64, act_fn='gelu')
        model = random_model(cfg, seed=0)
        p = make_prompts(gpt2_tokenizer(GPT2_FILES), 'numerals', 'done', n_prompts=a.gpt2_prompts, seed=0)
        ps, what = model_labelled_prompts(model, p.clean, p.corrupted, wrong_rank=20), 'numerals "done" prompts (GPT-2 tokenizer)'
        abl = compute_ablation(model, ps)
        nodes, t = timed(lambda: find_circuit(model, ps, ablation=abl, progress=False))
        print(f"GPT-2-size random model: node knockout {t:.2f} s")
        bench(f'GPT-2-small-size random model, {what}, labelled with its own top prediction vs its 21st', model, ps, abl,
              nodes, spps=(4,), orders=('backward',))
