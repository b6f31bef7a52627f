"Tests of the training loop, the 1-layer experiment and the organism: seeded training is reproducible, splits are disjoint, the shipped organism loads and works."
import random, warnings

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

warnings.filterwarnings('ignore', message='HookedTransformer is deprecated')

from seqcircuits.train import TrainHistory, train
from seqcircuits.one_layer import Experiment, SeqKind, one_layer_experiment, toy_splits
from seqcircuits.organism import (OrganismData, _organism_prompt, heldout_key, heldout_prompts, organism_config,
                                  organism_sampler, organism_tokenizer, prompt_fillers, prompt_scores, train_organism)
from seqcircuits.model import organism_dir



def _state(model): return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_same_weights():
    "Two short organism runs with one seed give identical weights and curves; another seed does not."
    torch.set_num_threads(1)
    (m1, h1), (m2, h2) = (train_organism(seed=0, steps=4, progress=False, n_layers=1, d_model=32, d_mlp=64) for _ in range(2))
    s1, s2 = _state(m1), _state(m2)
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    np.testing.assert_array_equal(h1.loss, h2.loss)
    m3, _ = train_organism(seed=1, steps=4, progress=False, n_layers=1, d_model=32, d_mlp=64)
    assert not torch.equal(_state(m3)['embed.W_E'], s1['embed.W_E'])


def test_one_layer_curves_reproducible():
    torch.set_num_threads(1)
    _, h1, t1 = one_layer_experiment('add2', steps=30, progress=False)
    _, h2, t2 = one_layer_experiment('add2', steps=30, progress=False)
    np.testing.assert_array_equal(h1.loss, h2.loss)
    np.testing.assert_array_equal(h1.eval_acc['test'], h2.eval_acc['test'])
    assert t1.equals(t2)
    assert h1.loss[-1] < h1.loss[0]  # the optimiser trains the model it was given


@pytest.mark.parametrize('experiment', list(Experiment))
def test_splits_share_no_sequence(experiment):
    sp = toy_splits(experiment, seed=5)
    names = list(sp)
    for i, a in enumerate(names):
        for b in names[i + 1:]: assert not set(sp[a]) & set(sp[b]), (a, b)
    probe = {Experiment.ADD2: SeqKind.ADD2, Experiment.MUL2: SeqKind.MUL2}.get(experiment)
    if probe is not None:
        seen = {s.start for s in sp['train'] if s.kind == probe}
        unseen = {s.start for s in sp['test'] if s.kind == probe}
        assert seen and unseen and not seen & unseen


def test_history_json_roundtrip():
    h = TrainHistory(np.array([2.0, 1.0]), np.array([0.0, 0.5]), np.array([2]), {'val': np.array([1.5])}, {'val': np.array([0.25])}, 1.5, 3)
    h2 = TrainHistory.from_json(h.to_json())
    np.testing.assert_array_equal(h2.loss, h.loss); assert h2.eval_acc['val'][0] == 0.25 and h2.seed == 3


def test_vocab_mismatch_is_an_error():
    tok = organism_tokenizer()
    model = HookedTransformer(organism_config(len(tok) + 3, n_layers=1, d_model=32, d_mlp=64))
    model.tokenizer = tok
    with pytest.raises(ValueError, match='tokens but its d_vocab is'):
        train(model, organism_sampler(tok), steps=1, progress=False)


def test_training_never_draws_heldout_pairs():
    data, tok, rng = OrganismData(), organism_tokenizer(), random.Random(11)
    info = [_organism_prompt(data, tok, rng)[2] for _ in range(2000)]
    pairs = [d['fillers'] for d in info if 'fillers' in d]
    assert len(pairs) > 1000 and not any(heldout_key(*p, data.heldout) for p in pairs)


def test_shipped_organism_files():
    d = organism_dir()
    for f in ('config.json', 'model.safetensors', 'tokenizer.json', 'history.json'): assert (d/f).exists(), f  # size: test_model


@pytest.mark.parametrize('task', ['numerals', 'number_words', 'months'])
def test_shipped_organism_accuracy(organism_model, task):
    "Fresh held-out prompts (a seed no notebook uses) of every template: >= 99% top-1."
    for template in ('pure', 'born', 'lost', 'done'):
        ps = heldout_prompts(organism_model, task, template, 128, seed=123)
        if template != 'pure': assert all(heldout_key(*prompt_fillers(template, p)[:2]) for p in ps.prompts)
        s = prompt_scores(organism_model, ps)
        assert s['acc'] >= 0.99, (task, template, s)


def test_tokenizer_matches_shipped(organism_model):
    organism = organism_model
    "organism_tokenizer() is built from the data notebook's vocabulary(): if that changes, a retrain no longer reproduces the shipped organism."
    assert organism_tokenizer().get_vocab() == organism.tokenizer.get_vocab()
    assert organism_config().d_vocab == organism.cfg.d_vocab
