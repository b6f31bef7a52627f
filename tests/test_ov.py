"""OV scores: ground truth on hand-built heads, GPT-2-size models in bounded memory, one clear line for bad input."""
import json, os, subprocess, sys, textwrap

import pytest
import torch
from transformer_lens import HookedTransformerConfig

from seqcircuits.data import Task, word_tokenizer, vocabulary
from seqcircuits.model import random_model
from seqcircuits.ov import member_tokens, ov_scores, ov_detail, successor_heads, heads_across_tasks


def hand_model(tasks=('numerals', 'number_words', 'months')):
    "One layer, one dimension per token, LayerNorms in the path: head 0.0's OV is the successor map, 0.1's the identity."
    tok = word_tokenizer(vocabulary(tasks=tasks, templates=['pure']))
    V = len(tok)
    cfg = HookedTransformerConfig(n_layers=1, n_heads=2, d_model=V, d_head=V, d_vocab=V, n_ctx=8, act_fn='relu',
                                  normalization_type='LN', attn_only=True, seed=0)
    m = random_model(cfg, tokenizer=tok)
    succ = torch.zeros(V, V)
    for t in tasks:
        mt = member_tokens(m, t)
        succ[mt.ids[mt.has_next], mt.next_ids[mt.has_next]] = 1.0
    with torch.no_grad():
        m.W_E.copy_(torch.eye(V)); m.W_U.copy_(torch.eye(V)); m.b_U.zero_()
        a = m.blocks[0].attn
        a.W_V.copy_(torch.eye(V).expand(2, V, V)); a.b_V.zero_(); a.b_O.zero_()
        a.W_O[0].copy_(succ); a.W_O[1].copy_(torch.eye(V))
    return m


@pytest.fixture(scope='module')
def hand():
    return hand_model()


@pytest.mark.parametrize('task', ['numerals', 'number_words', 'months'])
def test_successor_map_scores_successor_one_and_copy_zero(hand, task):
    s = ov_scores(hand, task, progress=False).set_index('node')
    assert s.loc['0.0', 'successor'] == 1.0 and s.loc['0.0', 'successor_rank'] == 1.0
    assert s.loc['0.0', 'copy'] <= 1 / 12 and s.loc['0.0', 'copy_rank'] > 5
    assert s.loc['0.1', 'copy'] == 1.0 and s.loc['0.1', 'copy_rank'] == 1.0
    assert s.loc['0.1', 'successor'] == 0.0


def test_successor_head_found_across_tasks(hand):
    df = successor_heads(hand, progress=False)
    assert df.node.tolist() == ['0.0', '0.1'] and df.all_tasks.tolist() == [True, False]
    assert df.loc[0, ['numerals', 'number_words', 'months']].tolist() == [1.0, 1.0, 1.0]
    copy = heads_across_tasks({t: ov_scores(hand, t, progress=False) for t in ('numerals', 'months')}, 'copy')
    assert copy.node.iloc[0] == '0.1' and copy.lowest.iloc[0] == 1.0


def test_detail_lists_the_successor_first(hand):
    d = ov_detail(hand, '0.0', 'months')
    assert d.successor_rank.tolist() == [1] * 12
    assert d.top.str.split().str[0].tolist() == d.successor.tolist()
    assert d.successor.iloc[-1] == 'January'  # months wrap


def one_line_error(fn, match):
    with pytest.raises(ValueError) as e: fn()
    msg = str(e.value)
    assert match in msg and '\n' not in msg, msg
    return msg


def test_bad_input_gives_one_clear_line(organism_model):
    one_line_error(lambda: ov_scores(organism_model, Task('odd', ('one', 'two-three')), progress=False), "is 3 tokens")
    one_line_error(lambda: ov_scores(organism_model, Task('new', ('one', 'Zebra')), progress=False), "not in the vocabulary")
    for k in (0, -1, organism_model.cfg.d_vocab + 1, 2.5):
        one_line_error(lambda: ov_scores(organism_model, 'numerals', k=k, progress=False), 'k must be a whole number from 1')
    L, H = organism_model.cfg.n_layers, organism_model.cfg.n_heads
    one_line_error(lambda: ov_scores(organism_model, 'numerals', heads=[f'{L}.0'], progress=False), f'{L}.0 does not exist')
    one_line_error(lambda: ov_scores(organism_model, 'numerals', heads=[f'0.{H}'], progress=False), f'0.{H} does not exist')
    one_line_error(lambda: ov_scores(organism_model, 'numerals', input='unembed', progress=False), 'Unknown OV input')
    one_line_error(lambda: ov_detail(organism_model, 'MLP1', 'numerals'), 'is not an attention head')


GPT2_SIZE = textwrap.dedent('''
    import json, resource, sys, time, torch
    torch.set_num_threads(1)
    from seqcircuits.model import random_model, gpt2_small_config
    from seqcircuits.data import word_tokenizer, vocabulary
    from seqcircuits.ov import ov_scores
    model = random_model(gpt2_small_config(n_layers=int(sys.argv[1])), tokenizer=word_tokenizer(vocabulary()))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    df = ov_scores(model, 'months', progress=False)
    print(json.dumps(dict(rows=len(df), before_kb=before, peak_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                          seconds=time.time() - t0, d_vocab=model.cfg.d_vocab)))
''')


def test_gpt2_size_in_bounded_memory():
    "GPT-2 small's dimensions (d_vocab 50,257): a d_vocab x d_vocab float matrix alone would take 10 GB; scoring stays far below."
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    r = subprocess.run([sys.executable, '-c', GPT2_SIZE, '2'], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['d_vocab'] == 50257 and out['rows'] == 2 * 12
    grew_mb = (out['peak_kb'] - out['before_kb']) / 1024
    assert grew_mb < 500, f'ov_scores grew the process by {grew_mb:.0f} MB on GPT-2 dimensions'
