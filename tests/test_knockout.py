"""Iterative knockout against an independent computation: every score it reports, on the organism and a random model."""
import copy

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from seqcircuits.core import Node, PromptSet, Circuit
from seqcircuits.metrics import Metric
from seqcircuits.model import all_nodes
from seqcircuits.data import model_labelled_prompts
from seqcircuits.knockout import (find_circuit, history_frame, knockout_stability, drop_table,
                                  KnockoutStep, NodeScorer, random_order, FORWARD_FIRST)


# --- an independent computation: plain TransformerLens hooks, written here from scratch -------------------------
def _hook_name(node):
    return f'blocks.{node.layer}.attn.hook_z' if node.is_head else f'blocks.{node.layer}.hook_mlp_out'

class Plain:
    "Mean-ablated logit difference by plain forwards with hooks (means over the corrupted prompts, per position)."
    @torch.no_grad()
    def __init__(self, model, ps):
        self.model, self.ps = model, ps
        names = {_hook_name(n) for n in all_nodes(model)}
        _, cache = model.run_with_cache(ps.corrupted, names_filter=lambda n: n in names)
        self.means = {k: cache[k].mean(0) for k in names}
        self.full = self.logit_diff([])

    @torch.no_grad()
    def logit_diff(self, removed):
        hooks = []
        for n in removed:
            mean = self.means[_hook_name(n)]
            if n.is_head:
                def f(z, hook, h=n.head, v=mean[:, n.head]):
                    z = z.clone(); z[:, :, h] = v; return z
            else:
                def f(a, hook, v=mean): return v.expand_as(a).clone()
            hooks.append((_hook_name(n), f))
        logits = self.model.run_with_hooks(self.ps.clean, fwd_hooks=hooks)[:, -1]
        i = torch.arange(len(self.ps))
        return (logits[i, self.ps.answer] - logits[i, self.ps.wrong]).mean().item()

    def score(self, removed): return self.logit_diff(removed) / self.full

def replay(model, circuit):
    "Each step of the history with the set of components removed when it was tried."
    removed = set(all_nodes(model)) - set(Node.parse(n) for n in circuit.meta['start']) if circuit.meta['start'] else set()
    for _, s in history_frame(circuit).iterrows():
        node = Node.parse(s.node)
        yield s, removed | {node}
        if s.removed: removed.add(node)
    assert removed == set(all_nodes(model)) - circuit.nodes


# --- models -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def rand():
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=40,
                                  act_fn='gelu', normalization_type='LN', seed=2)
    model = HookedTransformer(cfg).eval()
    return model, model_labelled_prompts(model, n_prompts=16, n_pos=9, wrong_rank=39)

@pytest.fixture(scope='module')
def organism(organism_model):
    from seqcircuits.data import make_prompts, filter_prompts
    model = organism_model
    ps, _ = filter_prompts(model, make_prompts(model, 'numerals', 'born', n_prompts=32))
    return model, ps


@pytest.mark.parametrize('which', ['rand', 'organism'])
def test_every_reported_score_matches_plain_hooks(which, request):
    model, ps = request.getfixturevalue(which)
    c, plain = find_circuit(model, ps, progress=False), Plain(model, ps)
    steps = list(replay(model, c))
    assert len(steps) >= len(all_nodes(model))
    for s, removed in steps:
        assert abs(s.score - plain.score(removed)) < 1e-5, (s.node, s.score)
        assert s.removed == (s.score >= 0.8)
    assert abs(c.score - plain.score(set(all_nodes(model)) - c.nodes)) < 1e-5
    assert c.score >= 0.8 and len(c) < len(all_nodes(model))


@pytest.mark.parametrize('which', ['rand', 'organism'])
def test_fast_and_reference_agree(which, request):
    model, ps = request.getfixturevalue(which)
    settings = [dict(), dict(order=FORWARD_FIRST, ablation='resample', batch_size=len(ps) // 2 + 1), dict(order=random_order(1), metric='kl'),
                dict(threshold=0.6, mlps=False, ablation='zero')]
    for kw in settings[:2] if which == 'organism' else settings:
        fast = find_circuit(model, ps, progress=False, **kw)
        ref = find_circuit(model, ps, progress=False, engine='hooks', **kw)
        assert fast.nodes == ref.nodes, kw
        hf, hr = history_frame(fast), history_frame(ref)
        assert (hf[['pass', 'node', 'removed']] == hr[['pass', 'node', 'removed']]).all().all()
        assert (hf.score - hr.score).abs().max() < 1e-5


def test_dead_components_are_never_kept(rand):
    model, ps = rand
    for layer, head in ((0, 0), (0, 3), (1, 3)):
        dead = copy.deepcopy(model)
        with torch.no_grad():
            dead.blocks[layer].attn.W_O[head] = 0
            dead.blocks[layer].mlp.W_out.zero_(); dead.blocks[layer].mlp.b_out.zero_()
        for order in ('default', 'forward_first', 'random_0'):
            c = find_circuit(dead, ps, order=order, progress=False)
            assert Node.attn_head(layer, head) not in c and Node.mlp(layer) not in c, (layer, head, order, c)
    # and the same components are kept when they work
    c = find_circuit(model, ps, progress=False)
    assert Node.attn_head(0, 0) in c and Node.mlp(0) in c


def test_hooks_come_off_when_knockout_raises(rand):
    model, ps = rand
    class Flaky(Metric):
        calls = 0
        def per_prompt(self, logits, prompts, reference=None):
            Flaky.calls += 1
            if Flaky.calls > 6: raise KeyboardInterrupt
            return logits[:, 0] * 0 + 1
    for engine in ('fast', 'hooks'):
        Flaky.calls = 0
        with pytest.raises(KeyboardInterrupt): find_circuit(model, ps, metric=Flaky(), engine=engine, progress=False)
        assert sum(len(hp.fwd_hooks) for hp in model.hook_dict.values()) == 0


def test_history_and_circuit_round_trip(rand, tmp_path):
    model, ps = rand
    c = find_circuit(model, ps, progress=False)
    back = Circuit.from_json(c.to_json(tmp_path / 'c.json'))
    assert back.nodes == c.nodes and back.score == c.score and back.meta['history'] == c.meta['history']
    steps = [KnockoutStep.from_dict(d) for d in c.meta['history']]
    assert [s.to_dict() for s in steps] == c.meta['history']
    assert c.method == 'knockout' and c.threshold == 0.8 and c.meta['metric'] == 'logit_diff' and c.meta['ablation'] == 'mean'


def test_stability_runs_are_knockout_runs(rand):
    model, ps = rand
    st = knockout_stability(model, ps, orders=('default', 'random_5'), thresholds=(0.8, 0.9), progress=False)
    assert list(st.runs.run) == ['default | 0.8 | seed 0', 'random_5 | 0.8 | seed 0', 'default | 0.9 | seed 0',
                                 'random_5 | 0.9 | seed 0']
    assert st.circuits[3].nodes == find_circuit(model, ps, order='random_5', threshold=0.9, progress=False).nodes
    row = st.table.set_index('node')
    for n in all_nodes(model):
        assert row.kept[n.name] == sum(n in c for c in st.circuits) / 4
    assert set(st.robust) == set.intersection(*[set(c.names) for c in st.circuits])


def test_drop_tables_match_plain_hooks(rand):
    model, ps = rand
    full, plain = drop_table(model, ps, progress=False).set_index('node'), Plain(model, ps)
    for n in all_nodes(model):
        assert abs(full['drop'][n.name] - 100 * (plain.score([n]) - 1)) < 1e-3
    c = find_circuit(model, ps, progress=False)
    circ = drop_table(model, ps, base=c, progress=False).set_index('node')
    rest = set(all_nodes(model)) - c.nodes
    for n in c.nodes:
        want = 100 * (plain.score(rest | {n}) - plain.score(rest))
        assert abs(circ['drop'][n.name] - want) < 1e-3


def test_bad_input(rand):
    model, ps = rand
    for t in (0, 1.01, -1, float('nan')):
        with pytest.raises(ValueError, match=r'threshold must be in \(0, 1\]'): find_circuit(model, ps, threshold=t, progress=False)
    with pytest.raises(ValueError, match='<= 0: it does not do the task.*Filter the prompts'):
        find_circuit(model, PromptSet.from_tensors(ps.clean, ps.corrupted, ps.wrong, ps.answer), progress=False)
    with pytest.raises(ValueError, match=r"token ids \[40\] outside the model's vocabulary"):
        find_circuit(model, PromptSet.from_tensors(ps.clean, ps.corrupted, ps.answer.clamp(max=39) * 0 + 40, ps.wrong), progress=False)
    with pytest.raises(ValueError, match='must be >= 1'):
        NodeScorer(model, ps, batch_size=0)


@pytest.mark.parametrize('arch', [dict(attn_only=True), dict(positional_embedding_type='rotary', rotary_dim=8),
                                  dict(n_key_value_heads=2), dict(normalization_type='RMS', gated_mlp=True, act_fn='silu'),
                                  dict(parallel_attn_mlp=True)])
def test_fast_path_on_other_architectures(arch):
    cfg = HookedTransformerConfig(**(dict(n_layers=3, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_mlp=64, d_vocab=40,
                                          act_fn='gelu', normalization_type='LN', seed=3) | arch))
    model = HookedTransformer(cfg).eval()
    ps = model_labelled_prompts(model, n_prompts=12, n_pos=8, wrong_rank=39)
    if arch.get('parallel_attn_mlp'):
        with pytest.warns(UserWarning, match='does not support this architecture'): assert NodeScorer(model, ps).engine == 'hooks'
    fast, ref = find_circuit(model, ps, progress=False), find_circuit(model, ps, engine='hooks', progress=False)
    assert fast.nodes == ref.nodes
    assert (history_frame(fast).score - history_frame(ref).score).abs().max() < 1e-5
