"""Integration tests for `seqcircuits.data` beyond the data notebook: the research's full-size prompt sets with the real
GPT-2 tokenizer, and the word-level tokenizer against TransformerLens's own tokenization."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

from seqcircuits.data import TEMPLATES, make_prompts, gpt2_tokenizer, vocabulary, word_tokenizer

MAIN_TASKS = ('numerals', 'number_words', 'months')


@pytest.fixture(scope='module')
def gpt2():
    return gpt2_tokenizer(ROOT/'tests'/'data'/'gpt2-tokenizer')  # the repository's copy of GPT-2's tokenizer files


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


def test_gpt2_sets_members(gpt2_sets):
    "The research's 1,536-prompt sets (counts and lengths: the data notebook): members at member_pos, answer and wrong right."
    for (t, tp), ps in gpt2_sets.items():
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


def test_word_tokenizer_matches_transformer_lens(word_model):
    "Every task and template with the word-level tokenizer: the ids make_prompts writes are what TransformerLens tokenizes."
    tok = word_model.tokenizer
    for t in MAIN_TASKS:
        for tp in TEMPLATES:
            ps = make_prompts(word_model, t, tp, n_prompts=64)
            assert ps.clean.shape == ps.corrupted.shape and ps.d_vocab == len(tok)
            assert (ps.clean[:, 0] == tok.bos_token_id).all()
            assert torch.equal(ps.clean[0], word_model.to_tokens(ps.prompts[0])[0])
