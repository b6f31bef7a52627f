"Integration tests for `seqcircuits.data`: the research's prompt sets with the real GPT-2 tokenizer and a word-level tokenizer."
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

from seqcircuits.core import PromptSet
from seqcircuits.data import (TASKS, TEMPLATES, Template, Corruption, make_prompts, filter_prompts, gpt2_tokenizer,
                              find_gpt2_tokenizer, token_id, vocabulary, word_tokenizer, single_token_report, render)

MAIN_TASKS = ('numerals', 'number_words', 'months')


@pytest.fixture(scope='module')
def gpt2():
    tok = gpt2_tokenizer(find_gpt2_tokenizer(ROOT))
    if tok is None: pytest.skip('GPT-2 tokenizer files (shared/gpt2-tokenizer) not found')
    return tok


@pytest.fixture(scope='module')
def gpt2_sets(gpt2):
    return {(t, tp): make_prompts(gpt2, t, tp) for t in MAIN_TASKS for tp in TEMPLATES}


@pytest.fixture(scope='module')
def word_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    tok = word_tokenizer(vocabulary())
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=64, d_head=4, n_heads=4, d_mlp=32, act_fn='relu',
                                  d_vocab=len(tok), seed=0)
    return HookedTransformer(cfg, tokenizer=tok)


def test_gpt2_known_ids(gpt2):
    assert [token_id(gpt2, w) for w in (' January', ' one', ' 12', ' 5')] == [3269, 530, 1105, 642]


def test_members_and_fillers_single_gpt2_tokens(gpt2):
    for t in MAIN_TASKS:
        for m in TASKS[t].members: token_id(gpt2, ' ' + m)
    rep = single_token_report(gpt2)
    assert (rep.single_with_space == rep.n).all(), rep
    for tp in ('born', 'lost', 'done'):
        assert rep.loc[f'fillers {tp}', 'single_without_space'] == len(TEMPLATES[tp].fillers) >= 30


def test_gpt2_sets_equal_length_and_balanced(gpt2_sets):
    for (t, tp), ps in gpt2_sets.items():
        assert ps.n_prompts == 1536, (t, tp)
        assert ps.clean.shape == ps.corrupted.shape, (t, tp)
        assert ps.n_pos == (5 if tp == 'pure' else 24), (t, tp)
        counts = torch.bincount(torch.tensor(ps.starts))[1:].tolist()
        assert counts == [192] * 8, (t, tp, counts)
        assert len(ps.member_pos) == 4 and ps.d_vocab == 50257
        # every clean member sits at member_pos; the answer is the 5th member and wrong the 4th
        first = [ps.clean[i, list(ps.member_pos)].tolist() for i in range(8)]
        assert all(len(set(f)) == 4 for f in first)
        assert (ps.wrong == ps.clean[:, ps.member_pos[-1]]).all() or tp == 'pure'
        assert (ps.answer != ps.wrong).all()


def test_gpt2_fillers_kept_in_corruption(gpt2_sets):
    ps = gpt2_sets[('months', 'born')]
    non_member = [p for p in range(ps.n_pos) if p not in ps.member_pos]
    assert (ps.clean[:, non_member] == ps.corrupted[:, non_member]).all()
    assert (ps.clean[:, list(ps.member_pos)] != ps.corrupted[:, list(ps.member_pos)]).any()


def test_determinism(gpt2, gpt2_sets):
    again = make_prompts(gpt2, 'months', 'lost')
    assert again.digest() == gpt2_sets[('months', 'lost')].digest()
    assert again.prompts == gpt2_sets[('months', 'lost')].prompts
    assert make_prompts(gpt2, 'months', 'lost', seed=1).digest() != again.digest()


def test_repeat_last(gpt2):
    ps = make_prompts(gpt2, 'numerals', 'done', n_prompts=64, corruption=Corruption.REPEAT_LAST)
    assert ps.clean.shape == ps.corrupted.shape
    assert (ps.corrupted[:, list(ps.member_pos)] == ps.clean[:, [ps.member_pos[-1]]]).all()


def test_bad_input_gpt2(gpt2):
    with pytest.raises(ValueError, match='different token lengths'):
        make_prompts(gpt2, 'months', Template('plural', '{member}s'), 64)
    with pytest.raises(ValueError, match="'twelve' is 2 tokens"):
        token_id(gpt2, 'twelve')
    with pytest.raises(ValueError, match='nearest valid counts are'):
        make_prompts(gpt2, 'numerals', n_prompts=1000, starts=range(1, 8))


def test_word_tokenizer_path(word_model):
    tok = word_model.tokenizer
    assert word_model.to_str_tokens('Bob born in March.') == ['<bos>', 'Bob', 'born', 'in', 'March', '.']
    assert tok(' January', add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids('January')]
    for t in MAIN_TASKS:
        for tp in TEMPLATES:
            ps = make_prompts(word_model, t, tp, n_prompts=64)
            assert ps.clean.shape == ps.corrupted.shape and ps.d_vocab == len(tok)
            assert (ps.clean[:, 0] == tok.bos_token_id).all()
            assert torch.equal(ps.clean[0], word_model.to_tokens(ps.prompts[0])[0])
    with pytest.raises(ValueError, match='No prompt survives the filter'):
        filter_prompts(word_model, make_prompts(word_model, 'months', 'born', 64))


def test_promptset_checks():
    with pytest.raises(ValueError, match='same shape'):
        PromptSet.from_tensors([[1, 2, 3]], [[1, 2]], [1], [2])
    with pytest.raises(ValueError, match='outside'):
        PromptSet.from_tensors([[1, 2]], [[1, 12]], [1], [2], d_vocab=10)
