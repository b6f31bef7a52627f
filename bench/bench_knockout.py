"""Benchmark: fast iterative knockout against the reference loop (one full forward per candidate).

The fast engine (`find_circuit(..., engine='fast')`, what the default 'auto' picks) reuses the residual stream before the candidate's
layer, patches a candidate head's output into its block's attention output instead of rerunning the attention,
runs the last block's MLP and the unembedding at the final position only, and remembers sets already scored.
The reference (`engine='hooks'`) runs one plain forward with hooks per candidate. Both run here in one process, on
the same prompts, and the script prints the ratio of their wall (and CPU) times and whether they found the same
circuit with the same history.

    python bench/bench_knockout.py            # organism (if bundled) + GPT-2-small-size random model, restricted
    python bench/bench_knockout.py --full     # GPT-2-size: every head and MLP, all passes (slow on CPU)
    python bench/bench_knockout.py --device cuda
"""
from __future__ import annotations
import argparse, time, warnings

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from seqcircuits.core import Node
from seqcircuits.model import all_nodes, organism_dir, load_model
from seqcircuits.data import model_labelled_prompts
from seqcircuits.knockout import find_circuit, history_frame, NodeScorer

warnings.filterwarnings('ignore', category=DeprecationWarning)


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _short(c) -> str:
    return c.summary() if len(c) <= 30 else f"{len(c.heads)} heads, {len(c.mlps)} MLPs, {100 * c.score:.1f}% of full"


def compare(label: str, model, prompts, repeat: int = 1, **kw) -> dict:
    "Run the reference and the fast knockout on the same input (best of `repeat`); print and return timings and agreement."
    for engine in ('hooks', 'fast'): NodeScorer(model, prompts, engine=engine).score([all_nodes(model)[0]])  # warm up both engines
    w_ref = c_ref = w_fast = c_fast = float('inf')
    for _ in range(repeat):  # alternate, keep the best of each: the machine may be shared
        ref, w, c = timed(lambda: find_circuit(model, prompts, engine='hooks', **kw))
        w_ref, c_ref = min(w_ref, w), min(c_ref, c)
        fast, w, c = timed(lambda: find_circuit(model, prompts, engine='fast', **kw))
        w_fast, c_fast = min(w_fast, w), min(c_fast, c)
    h_ref, h_fast = history_frame(ref), history_frame(fast)
    same_hist = len(h_ref) == len(h_fast) and (h_ref[['pass', 'node', 'removed']] == h_fast[['pass', 'node', 'removed']]).all().all()
    diff = (h_ref.score - h_fast.score).abs().max() if same_hist else float('nan')
    res = dict(label=label, ref_s=w_ref, fast_s=w_fast, ratio=w_ref / w_fast, cpu_ratio=c_ref / max(c_fast, 1e-9),
               identical=ref.nodes == fast.nodes and same_hist, max_score_diff=diff, circuit=_short(fast),
               candidates=len(h_fast), passes=fast.meta['passes'])
    print(f"{label}\n  {prompts.n_prompts} prompts x {prompts.n_pos} tokens, {len(h_fast)} candidates tried in "
          f"{fast.meta['passes']} passes\n  reference {w_ref:.2f} s, fast {w_fast:.2f} s (best of {repeat}): ratio {res['ratio']:.2f}x "
          f"(CPU-time ratio {res['cpu_ratio']:.2f}x)\n  same circuit and history: {res['identical']}; "
          f"max |score difference| {diff:.2e}\n  circuit: {_short(fast)}", flush=True)
    return res


def organism(device, n_prompts: int, template: str, repeat: int = 3):
    from seqcircuits.data import make_prompts, filter_prompts
    model = load_model(device=device)
    out = []
    for task in ('numerals', 'number_words', 'months'):
        ps = make_prompts(model, task, template, n_prompts=n_prompts)
        ps, _ = filter_prompts(model, ps)
        out.append(compare(f"organism, {task}/{template} (heads+MLPs, all passes)", model, ps, repeat=repeat))
    return out


def gpt2_size(device, full: bool, n_prompts: int = 64, n_pos: int = 20):
    cfg = HookedTransformerConfig(n_layers=12, n_heads=12, d_model=768, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=64,
                                  act_fn='gelu', normalization_type='LN', seed=0, device=device)
    model = HookedTransformer(cfg).eval()
    ps = model_labelled_prompts(model, n_prompts=n_prompts, n_pos=n_pos)
    if full: return compare("GPT-2-small-size random model (every head and MLP, all passes)", model, ps)
    # one full forward takes ~10 s on 2 CPU cores: restrict the reference loop to 24 candidates spread over every
    # layer (head 0 and the MLP of each layer; the other heads pinned) and one backward pass
    keep = [n for n in all_nodes(model, mlps=False) if n.head != 0]
    return compare("GPT-2-small-size random model (RESTRICTED: candidates = head L.0 and MLP L of each layer, "
                   "other heads pinned; one backward pass)", model, ps, keep=keep, max_passes=1)


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--full', action='store_true', help='GPT-2-size: every head and MLP, all passes')
    ap.add_argument('--skip-gpt2', action='store_true')
    ap.add_argument('--skip-organism', action='store_true')
    ap.add_argument('--n-prompts', type=int, default=128, help='organism prompts per task before filtering')
    ap.add_argument('--template', default='born')
    ap.add_argument('--repeat', type=int, default=3, help='organism: best of this many alternating runs')
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s own)')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}", flush=True)
    rows = []
    if a.skip_organism: pass
    elif (organism_dir() / 'config.json').exists(): rows += organism(a.device, a.n_prompts, a.template, a.repeat)
    else: print("No bundled organism (seqcircuits/organism/): skipped.")
    if not a.skip_gpt2: rows.append(gpt2_size(a.device, a.full))
    print("\nSUMMARY (wall-time ratio reference/fast; >= 2 is the target)")
    for r in rows:
        print(f"  {r['ratio']:5.2f}x  identical={r['identical']}  {r['label']}")
