"""Path patching: the fast implementation against a plain one-forward-per-edge reference, on a random 3-layer model
with MLPs and (when bundled) on the model organism; faithfulness identities; the bad inputs."""
from dataclasses import replace

import pytest
from conftest import make_rand3
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from seqcircuits.core import Node, NodeKind, Channel, Edge, Circuit, PromptSet
from seqcircuits.model import config_fingerprint, enable_edge_hooks
from seqcircuits.metrics import get_metric
from seqcircuits.ablation import compute_ablation, ablated, complement
from seqcircuits.patching import (patching_runs, score_senders, find_edges, edge_faithfulness, receivers_of, senders_of,
                                  check_circuit)
from seqcircuits.data import model_labelled_prompts


# ---------------------------------------------------------------------------------------------------------------
# The reference: one full forward per edge, hook names written out, nothing shared with the fast path but the
# ablation values and the definition (see nbs/09_path_patching.ipynb).

def _contribution(model, cache, node):
    "A sender's contribution to the residual stream, read from a full cache."
    if node.kind == NodeKind.EMBED: return cache['blocks.0.hook_resid_pre']
    if node.is_mlp: return cache[f'blocks.{node.layer}.hook_mlp_out']
    return cache[f'blocks.{node.layer}.attn.hook_z'][:, :, node.head] @ model.blocks[node.layer].attn.W_O[node.head]


def _receiver_hook_name(model, receiver, channel):
    if receiver.kind == NodeKind.OUTPUT: return f'blocks.{model.cfg.n_layers - 1}.hook_resid_post'
    if receiver.is_mlp: return f'blocks.{receiver.layer}.hook_mlp_in'
    return f'blocks.{receiver.layer}.hook_{Channel(channel).value}_input'


@torch.no_grad()
def naive_edge_values(model, prompts, circuit, edges, metric='logit_diff', ablation=None):
    """Mean metric of the clean circuit-ablated run with each (sender, receiver, channel) patched: one full forward per
    edge. Also returns the clean and corrupted circuit runs' metric. The model is left with edge hooks enabled."""
    enable_edge_hooks(model)
    metric = get_metric(metric)
    abl = ablation if ablation is not None else compute_ablation(model, prompts, 'mean')
    off = complement(model, circuit)
    full = model(prompts.clean)[:, -1]
    with ablated(model, off, abl):
        clean_logits, clean_cache = model.run_with_cache(prompts.clean)
        corr_logits, corr_cache = model.run_with_cache(prompts.corrupted)
    out = []
    for s, r, ch in edges:
        delta = _contribution(model, corr_cache, s) - _contribution(model, clean_cache, s)
        def patch(act, hook):
            act = act.clone()
            if r.is_head: act[:, :, r.head] = act[:, :, r.head] + delta
            else: act = act + delta
            return act
        with ablated(model, off, abl):
            logits = model.run_with_hooks(prompts.clean, fwd_hooks=[(_receiver_hook_name(model, r, ch), patch)])
        out.append(metric(logits[:, -1], prompts, full))
    return out, metric(clean_logits[:, -1], prompts, full), metric(corr_logits[:, -1], prompts, full)


def all_candidate_edges(circuit, n_layers):
    return [(s, r, ch) for r, ch in receivers_of(circuit, n_layers) for s in senders_of(circuit, r)]


# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def rand3(): return make_rand3()


@pytest.fixture(scope='module')
def organism(organism_model):
    from seqcircuits.data import make_prompts, filter_prompts
    model = organism_model
    prompts, _ = filter_prompts(model, make_prompts(model, 'numerals', 'done', n_prompts=64, seed=0))
    prompts = prompts[:16]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    names = [f'{l}.{h}' for l in range(L) for h in range(0, H, 2)] + [f'MLP{l}' for l in range(L) if not model.cfg.attn_only]
    return model, prompts, Circuit.from_names(' '.join(names), config_hash=config_fingerprint(model.cfg))


def _fast_values(model, runs, circuit, engine):
    L = model.cfg.n_layers
    return [v for r, ch in receivers_of(circuit, L) for v in score_senders(model, runs, r, ch, rows_per_pass=37, engine=engine).tolist()]


_NAIVE = {}

@pytest.mark.parametrize('engine', ['fast', 'hooks'])
@pytest.mark.parametrize('which', ['rand3', 'organism'])
def test_fast_scores_equal_naive(which, engine, request):
    model, prompts, circuit = request.getfixturevalue(which)
    edges = all_candidate_edges(circuit, model.cfg.n_layers)
    runs = patching_runs(model, prompts, circuit, batch_size=7)
    fast = _fast_values(model, runs, circuit, engine)
    if which not in _NAIVE: _NAIVE[which] = naive_edge_values(model, prompts, circuit, edges)  # once for both engines
    naive, clean, corr = _NAIVE[which]
    assert len(fast) == len(naive) == len(edges) > 20
    assert abs(runs.clean_value - clean) < 1e-4 and abs(runs.corrupted_value - corr) < 1e-4
    ratio_fast = runs.to_scores(torch.tensor(fast), 'ratio')
    ratio_naive = [v / clean for v in naive]
    assert max(abs(a - b) for a, b in zip(ratio_fast, ratio_naive)) < 1e-4
    norm_fast = runs.to_scores(torch.tensor(fast), 'normalized')
    assert max(abs(a - (b - clean) / (clean - corr)) for a, b in zip(norm_fast, naive)) < 1e-4
    # the scores are not all trivially 1: some edges matter
    assert min(ratio_naive) < 0.95 or max(ratio_naive) > 1.05


@pytest.mark.parametrize('engine', ['fast', 'hooks'])
def test_resample_ablation_equals_naive(rand3, engine):
    model, prompts, circuit = rand3
    abl = compute_ablation(model, prompts, 'resample')
    runs = patching_runs(model, prompts, circuit, ablation=abl, batch_size=4)
    picks = [(Node.output(3), Channel.RESID_POST), (Node.attn_head(2, 1), Channel.K), (Node.mlp(1), Channel.MLP_IN),
             (Node.attn_head(1, 2), Channel.Q)]
    fast = [v for r, ch in picks for v in score_senders(model, runs, r, ch, rows_per_pass=9, engine=engine).tolist()]
    naive, _, _ = naive_edge_values(model, prompts, circuit, [(s, r, ch) for r, ch in picks for s in senders_of(circuit, r)],
                                    ablation=abl)
    assert max(abs(a - b) for a, b in zip(fast, naive)) < 1e-4


def test_find_edges_iteration(rand3):
    model, prompts, circuit = rand3
    found = find_edges(model, prompts, circuit, threshold=0.97, progress=False)
    assert found.method == 'path_patching' and found.edges
    kept = {e.key for e in found.edges}
    dropped = {Node.parse(n) for n in found.meta['dropped']}
    assert found.nodes == circuit.nodes - dropped
    # every kept node has a kept edge out; every dropped node has none and its inputs were never tested
    for n in found.nodes: assert any(e.sender == n for e in found.edges), n
    for n in dropped: assert not any(e.sender == n for e in found.edges)
    tested = {t['receiver'] for t in found.meta['receivers']}
    assert not tested & {n.name for n in dropped}
    # the kept edges are exactly those the naive reference scores below the threshold, among the tested receivers
    edges = [(Node.parse(s, 3), Node.parse(t['receiver'], 3), Channel(t['channel']))
             for t in found.meta['receivers'] for s in t['scores']]
    naive, clean, _ = naive_edge_values(model, prompts, circuit, edges)
    assert {e for e, v in zip(edges, naive) if v / clean < 0.97} == kept
    for e in found.edges: assert abs(e.score - naive[edges.index(e.key)] / clean) < 1e-4
    assert Circuit.from_json(found.to_json()) == found
    assert Circuit.from_json(found.to_json()).edges[0].score == found.edges[0].score


def test_edge_faithfulness_identities(rand3):
    model, prompts, circuit = rand3
    L = model.cfg.n_layers
    every = [Edge(s, r, ch) for s, r, ch in all_candidate_edges(circuit, L)]
    full_edges = replace(circuit, edges=tuple(every))
    abl = compute_ablation(model, prompts)
    node_score = patching_runs(model, prompts, circuit).node_score
    assert abs(edge_faithfulness(model, prompts, full_edges, ablation=abl) - node_score) < 1e-5
    # a node with no outgoing edge sends only its mean: the same as the node circuit without it
    for x in (Node.attn_head(1, 2), Node.mlp(0), Node.attn_head(0, 1)):
        cut = replace(circuit, edges=tuple(e for e in every if e.sender != x))
        without = patching_runs(model, prompts, circuit.with_nodes(circuit.nodes - {x}), ablation=abl).node_score
        assert abs(edge_faithfulness(model, prompts, cut, ablation=abl) - without) < 1e-4, x
        assert abs(without - node_score) > 1e-3  # the identity is not trivial
    # no edges at all differs from the node circuit
    assert abs(edge_faithfulness(model, prompts, circuit, ablation=abl) - node_score) > 1e-3


def test_bad_input(rand3):
    model, prompts, circuit = rand3
    other = HookedTransformerConfig(n_layers=3, d_model=32, n_ctx=16, d_head=8, n_heads=5, d_mlp=64, d_vocab=40, act_fn='gelu')
    with pytest.raises(ValueError, match='found on another model'):
        find_edges(model, prompts, replace(circuit, config_hash=config_fingerprint(other)), progress=False)
    with pytest.raises(ValueError, match='circuit is empty'):
        find_edges(model, prompts, Circuit(frozenset()), progress=False)
    with pytest.raises(ValueError, match='circuit is empty'):
        edge_faithfulness(model, prompts, Circuit(frozenset()))
    runs = patching_runs(model, prompts, circuit)
    with pytest.raises(ValueError, match='not causal'):
        score_senders(model, runs, Node.attn_head(1, 2), 'q', [Node.attn_head(2, 1)])
    with pytest.raises(ValueError, match='not causal'):
        score_senders(model, runs, Node.attn_head(1, 2), 'v', [Node.attn_head(1, 2)])
    with pytest.raises(ValueError, match='not causal'):
        score_senders(model, runs, Node.mlp(1), 'mlp_in', [Node.mlp(1)])
    with pytest.raises(ValueError, match='not a node of the circuit'):
        score_senders(model, runs, Node.attn_head(1, 0), 'q')
    with pytest.raises(ValueError, match='not causal'):
        Edge(Node.mlp(2), Node.attn_head(1, 0), 'q')


def test_edge_circuit_graphs(rand3, tmp_path):
    "End to end: find_edges on two prompt sets, one graph each and a combined one, written as PNG and SVG."
    from seqcircuits.graphs import plot_circuit, plot_circuits, save_figure
    model, prompts, circuit = rand3
    a = find_edges(model, prompts, circuit, threshold=0.97, progress=False, faithfulness=False)
    b = find_edges(model, prompts[:6], circuit, threshold=0.97, progress=False, faithfulness=False)
    fig = plot_circuit(a, n_layers=3)
    gids = [p.get_gid() or '' for p in fig.axes[0].patches]
    assert sum(g.startswith('edge:') for g in gids) == len(a.edges) > 0
    assert sum(g.startswith('node:') for g in gids) == len(a.nodes) + 2
    png, svg = save_figure(fig, tmp_path/'a')
    assert png.stat().st_size > 5000 and '<svg' in svg.read_text()
    both = plot_circuits({'all': a, 'first6': b}, n_layers=3)
    shared = a.nodes & b.nodes
    marked = [sum(p.get_linewidth() == 3 for p in ax.patches if (p.get_gid() or '').startswith('node:')) for ax in both.axes]
    assert marked == [len(shared)] * 2
    assert all(p.exists() for p in save_figure(both, tmp_path/'both'))


@pytest.mark.parametrize('engine', ['fast', 'hooks'])
def test_shared_prefix_equals_naive(rand3, engine):
    "Prompts whose clean and corrupted versions share their first tokens (templates): the sparse engine recomputes only\
    the positions after them (through two more blocks here), and only the moved rows of a patched query or MLP input."
    model, prompts, circuit = rand3
    corrupted = prompts.clean.clone()
    corrupted[:, 3:] = prompts.corrupted[:, 3:]
    corrupted[::2, 5] = prompts.clean[::2, 5]  # some positions after the prefix agree too
    ps = model_labelled_prompts(model, prompts.clean, corrupted)
    runs = patching_runs(model, ps, circuit, engine=engine)
    assert runs.start == 3 and set(runs.resid) == {0, 1, 2, 3}
    edges = all_candidate_edges(circuit, 3)
    fast = _fast_values(model, runs, circuit, engine)
    naive, clean, _ = naive_edge_values(model, ps, circuit, edges)
    assert max(abs(a - b) for a, b in zip(fast, naive)) < 1e-5 * max(1.0, abs(clean))
    assert max(abs(a - clean) for a in naive) > 1e-3  # some patch changes something


@pytest.mark.parametrize('which', ['organism', 'rand3'])
def test_prompt_parts_equal_one_run(which, request):
    "find_edges over prompt parts (when the caches of all prompts do not fit) finds the same edges with the same scores."
    model, prompts, circuit = request.getfixturevalue(which)
    abl = compute_ablation(model, prompts, 'resample' if which == 'rand3' else 'mean')
    kw = dict(threshold=0.97 if which == 'rand3' else 0.9, ablation=abl, progress=False)
    one, parts = find_edges(model, prompts, circuit, **kw), find_edges(model, prompts, circuit, prompts_per_run=3, **kw)
    assert parts.meta['prompts_per_run'] == 3 and one.meta['prompts_per_run'] == prompts.n_prompts
    assert one.edges and parts.edges == one.edges and parts.nodes == one.nodes
    assert abs(parts.score - one.score) < 1e-6
    for a, b in zip(parts.meta['receivers'], one.meta['receivers']):
        assert a['receiver'] == b['receiver'] and max(abs(a['scores'][s] - b['scores'][s]) for s in a['scores']) < 1e-4


@pytest.mark.parametrize('variant', ['rotary_rms', 'attn_only', 'local_softcap', 'ln_pre'])
def test_sparse_engine_architectures(variant):
    "The sparse engine reproduces TransformerLens on other architectures (or the model falls back to the blocks engine)."
    kw = dict(n_layers=2, d_model=24, n_ctx=12, d_head=6, n_heads=4, d_mlp=48, d_vocab=30, act_fn='gelu',
              normalization_type='LN', seed=3)
    if variant == 'rotary_rms': kw.update(positional_embedding_type='rotary', rotary_dim=4, normalization_type='RMS', act_fn='silu', gated_mlp=True)
    if variant == 'attn_only': kw.update(attn_only=True, d_mlp=None)
    if variant == 'ln_pre': kw.update(normalization_type='LNPre')  # GPT-2 from the hub: LayerNorm weights folded in
    if variant == 'local_softcap': kw.update(attn_types=['local', 'global'], window_size=3, attn_scores_soft_cap=5.0)
    model = HookedTransformer(HookedTransformerConfig(**kw)).eval()
    g = torch.Generator().manual_seed(1)
    clean, corrupted = torch.randint(0, 30, (6, 8), generator=g), torch.randint(0, 30, (6, 8), generator=g)
    corrupted[:, :3] = clean[:, :3]  # a shared prefix, as in templated prompts: the sparse engine skips it
    prompts = model_labelled_prompts(model, clean, corrupted)
    names = '0.0 0.2 1.1 1.3' + (' 1.0 1.2' if variant == 'attn_only' else ' MLP0 MLP1')  # attn_only: a full layer of heads
    circuit = Circuit.from_names(names, config_hash=config_fingerprint(model.cfg))
    runs = patching_runs(model, prompts, circuit)
    assert runs.start == 3
    fast = [v for r, ch in receivers_of(circuit, 2) for v in score_senders(model, runs, r, ch, engine='fast').tolist()]
    naive, clean, _ = naive_edge_values(model, prompts, circuit, all_candidate_edges(circuit, 2))
    assert max(abs(a - b) for a, b in zip(fast, naive)) < 1e-4 * max(1.0, abs(clean))
    assert max(abs(a - clean) for a in naive) > 1e-3  # some patch changes something
