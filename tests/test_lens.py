"""Reference checks of the logit lens and direct logit attribution against TransformerLens's own tools, on the organism."""
import copy

import pytest
import torch

from seqcircuits.core import concat_prompts
from seqcircuits.model import all_nodes, act_name
from seqcircuits.data import make_prompts, filter_prompts
from seqcircuits.lens import logit_lens, dla_per_prompt
from seqcircuits.mlps import token_strings

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def organism(organism_model):
    "The organism and a small filtered prompt set of months."
    model = organism_model
    sets = [make_prompts(model, 'months', t, n_prompts=48, seed=i) for i, t in enumerate(('born', 'lost', 'done'))]
    prompts, _ = filter_prompts(model, concat_prompts(sets, task='months'))
    return model, prompts


def test_lens_matches_transformer_lens(organism):
    "Our lens = TransformerLens's accumulated residual stream with the final norm recomputed per point, then W_U."
    model, ps = organism
    ours = logit_lens(model, ps, k=5, progress=False)
    with torch.no_grad():
        _, cache = model.run_with_cache(ps.clean)
        stack, labels = cache.accumulated_resid(incl_mid=True, pos_slice=-1, return_labels=True)
        probs = model.unembed(cache.apply_ln_to_stack(stack, pos_slice=-1, recompute_ln=True)).softmax(-1)
    assert len(labels) == len(ours.points)
    torch.testing.assert_close(ours.answer_prob, probs.gather(-1, ps.answer[None, :, None].expand(len(labels), -1, 1))[..., 0],
                               atol=1e-5, rtol=1e-4)
    assert (ours.top_ids == probs.topk(5, -1).indices).float().mean() > 0.999  # up to ties among near-equal probabilities
    assert token_strings(model, ours.top_ids[-1, :, 0]) == model.to_str_tokens(probs[-1].argmax(-1))


def test_dla_matches_transformer_lens_logit_attrs(organism):
    "With the final norm folded into W_U (LNPre), each head's and MLP's term is TransformerLens's `logit_attrs`."
    model, ps = organism
    folded = copy.deepcopy(model)
    folded.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert folded.cfg.normalization_type == 'LNPre'
    ours = dla_per_prompt(folded, ps, progress=False)
    with torch.no_grad():
        _, cache = folded.run_with_cache(ps.clean)
        heads = cache.stack_head_results(layer=-1, pos_slice=-1)  # [layer*head, batch, d_model], forward order
        mlps = torch.stack([cache[act_name('mlp_out', l)][:, -1] for l in range(folded.cfg.n_layers)])
        ref_heads = cache.logit_attrs(heads, ps.answer, ps.wrong, pos_slice=-1)
        ref_mlps = cache.logit_attrs(mlps, ps.answer, ps.wrong, pos_slice=-1)
    names = [n.name for n in all_nodes(folded, mlps=False)]
    for i, n in enumerate(names):
        torch.testing.assert_close(torch.tensor(ours[n].values), ref_heads[i].double(), atol=1e-5, rtol=1e-4)
    for l in range(folded.cfg.n_layers):
        torch.testing.assert_close(torch.tensor(ours[f'MLP{l}'].values), ref_mlps[l].double(), atol=1e-5, rtol=1e-4)
    assert ours['rest'].abs().max() < 1e-4


def test_dla_unchanged_by_folding(organism):
    """Folding the norms' weights and centring the writing weights changes no MLP, embedding or bias term (the final
    norm centres and scales anyway); it moves each head's value bias (b_V W_O) into b_O, so per layer heads + b_O agree."""
    model, ps = organism
    folded = copy.deepcopy(model)
    folded.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    a, b = dla_per_prompt(model, ps, progress=False), dla_per_prompt(folded, ps, progress=False)
    close = lambda x, y: torch.testing.assert_close(torch.tensor(x.values), torch.tensor(y.values), atol=2e-4, rtol=1e-3)
    for col in ['embed', 'final biases', 'logit_diff'] + [f'MLP{l}' for l in range(model.cfg.n_layers)]: close(a[col], b[col])
    for l in range(model.cfg.n_layers):
        cols = [f'{l}.{h}' for h in range(model.cfg.n_heads)] + [f'b_O{l}']
        close(a[cols].sum(axis=1), b[cols].sum(axis=1))
