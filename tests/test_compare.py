"""Integration tests for `seqcircuits.compare`: the overlap null, the circuit-on-other-task matrix and its controls,
and balancing per template (what the comparison's prompt sets rest on)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

from seqcircuits.core import Circuit, Edge, Node, concat_prompts
from seqcircuits.model import gpt2_small_config
from seqcircuits.data import make_prompts, filter_prompts, token_id
from seqcircuits.ablation import compute_ablation
from seqcircuits.knockout import find_circuit
from seqcircuits.compare import (overlap_null, random_circuit, random_edge_circuit, circuit_on_other_task, edit_effect,
                                 edit_table, shared_core)

torch.set_num_threads(1)
CFG = gpt2_small_config()
NUMERALS = Circuit.from_names('0.1 1.5 4.4 4.10 5.0 6.1 6.6 6.10 7.11 8.1 8.6 8.8 8.9 9.1 MLP0 MLP1 MLP9', task='numerals')
E = lambda s, r, ch: Edge(Node.parse(s, 12), Node.parse(r, 12), ch)
EDGES = Circuit.from_names('4.4 7.11 9.1 MLP0', task='numerals', edges=(
    E('embed', 'MLP0', 'mlp_in'), E('MLP0', '4.4', 'v'), E('4.4', '9.1', 'v'), E('MLP0', '9.1', 'q'), E('embed', '9.1', 'k'),
    E('7.11', '9.1', 'v'), E('4.4', '7.11', 'k'), E('9.1', 'output', 'resid_post'), E('7.11', 'output', 'resid_post')))


@pytest.mark.parametrize('what, circuit, kw', [('nodes', NUMERALS, {}), ('nodes', NUMERALS, {'match': 'total'}),
                                               ('edges', EDGES, {}), ('edges', EDGES, {'senders': 'model'})])
def test_overlap_with_itself_has_the_smallest_p(what, circuit, kw):
    t = overlap_null(CFG, {'a': circuit, 'b': circuit}, what, n_draws=5000, seed=1, **kw)
    assert t.observed[0] == (len(circuit) if what == 'nodes' else len(circuit.edges))
    assert t.p[0] == 1 / 5001 and t.z[0] > 3 and t.expected[0] < t.observed[0]


def test_draws_are_reproducible():
    assert random_circuit(CFG, NUMERALS, seed=7) == random_circuit(CFG, NUMERALS, seed=7)
    assert len({random_circuit(CFG, NUMERALS, seed=s).nodes for s in range(5)}) > 1
    assert random_edge_circuit(CFG, EDGES, seed=3).edges == random_edge_circuit(CFG, EDGES, seed=3).edges
    other = random_circuit(CFG, NUMERALS, seed=11)
    a = overlap_null(CFG, {'a': NUMERALS, 'b': other, 'c': random_circuit(CFG, NUMERALS, seed=12)}, n_draws=500, seed=5)
    b = overlap_null(CFG, {'a': NUMERALS, 'b': other, 'c': random_circuit(CFG, NUMERALS, seed=12)}, n_draws=500, seed=5)
    assert a.equals(b) and list(a.tasks) == ['a & b', 'a & c', 'b & c', 'a & b & c']
    assert not a.expected.equals(overlap_null(CFG, {'a': NUMERALS, 'b': other, 'c': random_circuit(CFG, NUMERALS, seed=12)},
                                              n_draws=500, seed=6).expected)


@pytest.fixture(scope='module')
def organism(organism_model):
    "The organism with prompts of two tasks and a stand-in control task, their ablations and the two tasks' circuits."
    model = organism_model
    prompts = {t: filter_prompts(model, make_prompts(model, t, 'born', n_prompts=64, seed=0))[0]
               for t in ('numerals', 'months', 'letters')}
    abl = {t: compute_ablation(model, p) for t, p in prompts.items()}
    circuits = {t: find_circuit(model, prompts[t], ablation=abl[t], progress=False) for t in ('numerals', 'months')}
    return model, prompts, abl, circuits


def test_matrix_diagonal_is_each_circuits_own_score_and_controls(organism):
    model, prompts, abl, circuits = organism
    m = circuit_on_other_task(model, prompts, circuits, controls=['letters'], ablation=abl, n_random=2, progress=False)
    assert list(m.index) == ['numerals', 'months', 'letters']            # the control task's data is the last row
    assert list(m.columns) == ['numerals', 'months', 'shared core', 'random']
    for t, c in circuits.items(): assert abs(m.loc[t, t] - 100 * c.score) < 1e-3
    user = Circuit.from_names('0.0 MLP0', task='user control')
    m2 = circuit_on_other_task(model, prompts, circuits, control=user, controls=['letters'], ablation=abl, progress=False)
    assert m2.columns[-1] == 'user control' and abs(m2.loc['months', 'months'] - m.loc['months', 'months']) < 1e-9


def test_editing_nothing_or_scaling_by_one_changes_nothing(organism):
    model, prompts, abl, circuits = organism
    core = shared_core(circuits)
    t = edit_table(edit_effect(model, prompts, core, edits=(1.0, 'ablate'), controls=['letters'], ablation=abl, progress=False))
    assert (abs(t['x1'] - 100) < 1e-4).all() and (t['ablated'] < 100).all()


class FailWhere(torch.nn.Module):
    "The organism, except that it gets every prompt holding all the `bad` words wrong (a model that fails some prompts)."
    def __init__(self, model, bad):
        super().__init__()
        self.model, self.cfg, self.tokenizer = model, model.cfg, model.tokenizer
        self.bad = [torch.tensor([token_id(model, w), token_id(model, ' ' + w)]) for w in bad]
    def forward(self, tokens):
        out = self.model(tokens)
        hit = torch.stack([torch.isin(tokens, b).any(-1) for b in self.bad]).all(0)
        return torch.where(hit[:, None, None], -out, out)


def test_balancing_is_per_template(organism):
    model = organism[0]
    # the study pools its templates into one set per task; this model fails the 'lost' prompts that mention a key
    pool = concat_prompts([make_prompts(model, 'numerals', t, 192, seed=i) for i, t in enumerate(('born', 'lost', 'done'))])
    kept, rep = filter_prompts(FailWhere(model, ['Key']), pool)
    assert rep.loc['lost'].failed_top1.sum() > 0 and rep.loc['born'].failed_top1.sum() == 0
    per_template = rep.kept.groupby(level='template', sort=False).sum()
    assert list(per_template.index) == ['born', 'lost', 'done'] and per_template.nunique() == 1
    assert rep.kept.nunique() == 1                                        # every (template, start member) keeps the same
    assert [p['n'] for p in kept.meta['parts']] == list(per_template)


def test_the_prompts_stage_keeps_its_share_of_every_template(organism, tmp_path):
    from seqcircuits.study import StudySettings, Study, PROMPTS_STAGE, run_study
    import pandas as pd
    # a model that fails the 'lost' prompts mentioning both a key and a phone: a few in every start member
    st = StudySettings(tasks=('numerals',), n_prompts=1536)
    run_study(st, tmp_path, [PROMPTS_STAGE], model=FailWhere(organism[0], ['Key', 'Phone']), progress=False)
    study = Study(tmp_path, st, organism[0])
    report = pd.read_csv(study.stage_dir('prompts', 'numerals')/'filter.csv')
    failed = report.groupby('template').failed_top1.sum()
    assert failed['born'] == failed['done'] == 0 and failed['lost'] > 0
    assert (report.kept == 64).all()                                             # 512 per template x 3
    ps = study.prompts('numerals')
    assert ps.n_prompts == 1536 and [p['n'] for p in ps.meta['parts']] == [512, 512, 512]
