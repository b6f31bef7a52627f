"""Benchmark: fast path patching against the naive reference, in one run, with identical scores.

Both sides get the same mean-ablation values, computed once outside the timings: the ablation is an input of path
patching, which the study computes once per task and shares with knockout. The ratio that counts its time on both sides
is printed too.
Fast: `patching_runs` (the cached clean and corrupted circuit runs, counted in full) plus `score_senders` for each
receiver (one batched forward from the receiver's block), with either engine: `fast` (the default: only the circuit's
own nodes are computed) and `hooks` (TransformerLens blocks with hooks). Naive: `naive_edge_values` from
tests/test_patching.py, one full forward per edge. Printed per case: wall times, the wall-time ratio (and the CPU-time
ratio, steadier on a shared machine), and the largest difference of the edge scores.
On the GPT-2-size model the naive loop takes minutes per receiver, so both sides run the same subsample of receivers
(every n-th, all of their senders); the fast side still pays for its whole one-off cache.

On the organism each side is timed `--repeats` times (default 3) and the best time kept; the GPT-2-size cases (random
tokens, and templated prompts with GPT-2's tokenizer from tests/data/gpt2-tokenizer) run once.
Run: `python bench/bench_patching.py --threads 1` (`--quick` for a smoke run, `--every N`, `--repeats N`).
"""
import argparse, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]/'tests'))
from test_patching import naive_edge_values  # the plain reference lives with the tests
from seqcircuits.core import Circuit
from seqcircuits.model import config_fingerprint, organism_dir, load_model, gpt2_small_config, random_model
from seqcircuits.data import model_labelled_prompts, make_prompts, gpt2_tokenizer

GPT2_FILES = Path(__file__).resolve().parents[1]/'tests'/'data'/'gpt2-tokenizer'  # the repository's copy of GPT-2's tokenizer files
from seqcircuits.patching import patching_runs, score_senders, receivers_of, senders_of
from seqcircuits.ablation import compute_ablation


def best_of(repeats, fn):
    "Run `fn` `repeats` times; its last result and the shortest (wall, CPU) times (the usual way to time on a shared machine)."
    times = []
    for _ in range(repeats):
        t0 = (time.perf_counter(), time.process_time())
        out = fn()
        times.append((time.perf_counter() - t0[0], time.process_time() - t0[1]))
    return out, [min(t[0] for t in times), min(t[1] for t in times)]


def bench(name, model, prompts, circuit, every=1, rows_per_pass=512, repeats=1):
    "Time both fast engines and the naive loop on the same edges: every `every`-th receiver (all senders of each)."
    L = model.cfg.n_layers
    recs = receivers_of(circuit, L)[::every]
    edges = [(s, r, ch) for r, ch in recs for s in senders_of(circuit, r)]
    sub = '' if every == 1 else f' (every {every}th receiver: {len(recs)} of {len(receivers_of(circuit, L))})'
    best = '' if repeats == 1 else f', best of {repeats} runs each'
    print(f"{name}: {len(circuit)}-node circuit, {prompts.n_prompts} prompts x {prompts.n_pos} tokens, {len(edges)} edges{sub}{best}")
    # the mean ablation is an input of path patching (the study computes it once per task, for knockout too): both
    # sides get the same values, and the ratio counting its time on both sides is printed as well
    abl, t_abl = best_of(repeats, lambda: compute_ablation(model, prompts, 'mean'))
    (naive, clean, _), t_naive = best_of(repeats, lambda: naive_edge_values(model, prompts, circuit, edges, ablation=abl))
    model.set_use_split_qkv_input(False); model.set_use_hook_mlp_in(False)
    out = {}
    for engine in ('fast', 'hooks'):
        def fast_run():
            runs = patching_runs(model, prompts, circuit, ablation=abl, engine=engine)  # the cached runs count in full
            return runs, [v for r, ch in recs for v in score_senders(model, runs, r, ch, rows_per_pass=rows_per_pass, engine=engine).tolist()]
        (runs, fast), t_fast = best_of(repeats, fast_run)
        diff = max(abs(a / runs.clean_value - b / clean) for a, b in zip(fast, naive))
        print(f"  {engine:6s}: fast {t_fast[0]:7.2f} s, naive {t_naive[0]:7.2f} s, wall-time ratio {t_naive[0] / t_fast[0]:5.1f}x "
              f"(CPU-time ratio {t_naive[1] / t_fast[1]:5.1f}x; counting the {t_abl[0]:.2f} s mean ablation on both sides "
              f"{(t_naive[0] + t_abl[0]) / (t_fast[0] + t_abl[0]):5.1f}x); max |score diff| {diff:.1e}; identical to 1e-4: {diff < 1e-4}")
        out[engine] = (t_naive[0] / t_fast[0], diff)
    return out


def gpt2_size(quick=False, templated=False):
    "A random model of GPT-2 small's size on random 20-token prompts, or (`templated`) on the numerals 'done' template\
    tokenized with GPT-2's own tokenizer (24 tokens; clean and corrupted agree except at the members)."
    cfg = gpt2_small_config(n_ctx=64, act_fn='gelu')
    model = random_model(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    n = 8 if quick else 16
    if templated:
        ps = make_prompts(gpt2_tokenizer(GPT2_FILES), 'numerals', 'done', n_prompts=n, seed=0)
        clean, corrupted = ps.clean, ps.corrupted
    else: clean, corrupted = [torch.randint(0, cfg.d_vocab, (n, 20), generator=g) for _ in range(2)]
    prompts = model_labelled_prompts(model, clean, corrupted)  # a random model does no task: its own top-2 as labels
    # the published GPT-2 small numerals circuit's 14 heads and 6 of its MLPs: 20 nodes
    circuit = Circuit.from_names('0.1 1.5 4.4 4.10 5.0 6.1 6.6 6.10 7.11 8.1 8.6 8.8 8.9 9.1 MLP0 MLP1 MLP2 MLP9 MLP10 MLP11',
                                 config_hash=config_fingerprint(cfg))
    return model, prompts, circuit


def organism_cases(n_large=256):
    "The organism on numerals prompts: its knockout circuit and the circuit of all its heads and MLPs on 64 prompts,\
    and the knockout circuit on `n_large` prompts (0: not)."
    from seqcircuits.data import make_prompts, filter_prompts
    from seqcircuits.knockout import find_circuit
    from seqcircuits.model import all_nodes
    model = load_model()
    many = filter_prompts(model, make_prompts(model, 'numerals', 'done', n_prompts=max(128, 2 * n_large), seed=0))[0]
    prompts = many[:64]
    knock = find_circuit(model, prompts, progress=False)
    full = Circuit(frozenset(all_nodes(model)), config_hash=config_fingerprint(model.cfg))
    cases = [('knockout circuit', prompts, knock), ('all heads and MLPs', prompts, full)]
    return model, cases + ([('knockout circuit', many[:n_large], knock)] if n_large else [])


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--quick', action='store_true', help='fewer prompts and receivers (smoke run)')
    ap.add_argument('--every', type=int, default=8, help='time every n-th receiver on the GPT-2-size model')
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s own choice)')
    ap.add_argument('--repeats', type=int, default=3, help='time each side on the organism this many times and keep the best')
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    if a.threads: torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if (organism_dir()/'model.safetensors').exists():
        model, cases = organism_cases(0 if a.quick else 256)
        for name, prompts, circuit in cases: bench(f'organism, {name}', model, prompts, circuit, repeats=a.repeats)
    else: print('organism: not bundled, skipped')
    bench('GPT-2-small-size random model, random tokens', *gpt2_size(a.quick), every=12 if a.quick else a.every)
    bench('GPT-2-small-size random model, numerals "done" prompts (GPT-2 tokenizer)', *gpt2_size(a.quick, templated=True),
          every=12 if a.quick else a.every)
