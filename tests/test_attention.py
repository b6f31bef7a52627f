"""Attention summaries on hand-built heads, circuitsvis views that render offline in a real headless browser, and the
study report's new sections (no network address anywhere, every embedded view drawn)."""
import os, re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformerConfig

from seqcircuits.attention import (attention_summary, attention_parts, attention_view, compare_attention, browser_dom,
                                   find_browser, offline_problems)
from seqcircuits.data import make_prompts, word_tokenizer, vocabulary
from seqcircuits.model import random_model


def previous_token_model(n_ctx=24):
    "One layer, one dimension per token and per position: head 0.0 attends to the previous token, head 0.1 evenly."
    tok = word_tokenizer(vocabulary(tasks=['numerals', 'months'], templates=['pure', 'born']))
    V = len(tok)
    cfg = HookedTransformerConfig(n_layers=1, n_heads=2, d_model=V + n_ctx, d_head=n_ctx, d_vocab=V, n_ctx=n_ctx,
                                  act_fn='relu', normalization_type=None, attn_only=True, seed=0)
    m = random_model(cfg, tokenizer=tok)
    with torch.no_grad():
        m.W_E.zero_(); m.W_E[:, :V] = torch.eye(V)
        m.W_pos.zero_(); m.W_pos[:, V:] = torch.eye(n_ctx)
        a = m.blocks[0].attn
        for w in (a.W_Q, a.W_K, a.b_Q, a.b_K): w.zero_()
        a.W_Q[0, V:] = 100 * torch.eye(n_ctx)
        a.W_K[0, V:V + n_ctx - 1, 1:] = torch.eye(n_ctx - 1)
    return m


@pytest.fixture(scope='module')
def prev():
    return previous_token_model()


def test_previous_token_head_shows_in_the_summary(prev):
    pure = attention_summary(prev, make_prompts(prev, 'months', 'pure', n_prompts=16)).set_index('node')
    assert pure.loc['0.0', 'member_3'] > 1 - 1e-6 and pure.loc['0.0', 'top'] == 'member_3'
    # the even head: 1/5 on each of BOS and the four members of '<bos> January February March April'
    parts = attention_parts(pure.reset_index())
    assert np.allclose(pure.loc['0.1', parts].to_numpy(float), [0.2] * 4 + [0, 0, 0, 0.2, 0], atol=1e-6), pure.loc['0.1', parts]
    born = attention_summary(prev, make_prompts(prev, 'numerals', 'born', n_prompts=16)).set_index('node')
    assert born.loc['0.0', 'other'] > 1 - 1e-6  # from the final ' in' to ' born'
    # the same pattern on both tasks: compare_attention calls the heads the same
    same = compare_attention({t: attention_summary(prev, make_prompts(prev, t, 'pure', n_prompts=16)) for t in ('numerals', 'months')})
    assert same.same.all() and same.max_tv.max() < 1e-6


def test_rows_sum_to_one_on_the_organism(organism_model):
    df = attention_summary(organism_model, make_prompts(organism_model, 'number_words', 'lost', n_prompts=64))
    assert np.allclose(df[attention_parts(df)].sum(axis=1), 1, atol=1e-6)
    assert len(df) == organism_model.cfg.n_layers * organism_model.cfg.n_heads


def test_bad_input_gives_one_clear_line(prev):
    ps = make_prompts(prev, 'months', 'pure', n_prompts=8)
    for fn, match in ((lambda: attention_summary(prev, ps, heads=['0.2']), '0.2 does not exist'),
                      (lambda: attention_summary(prev, ps, heads=['3.0']), '3.0 does not exist'),
                      (lambda: attention_summary(prev, ps, query_pos=9), 'outside the prompts'),
                      (lambda: attention_view(prev, ps, []), 'at least one head'),
                      (lambda: attention_view(prev, ps, ['0.0'], index=8), 'outside the 8 prompts')):
        with pytest.raises(ValueError) as e: fn()
        assert match in str(e.value) and '\n' not in str(e.value), str(e.value)


def browser():
    "The headless browser, or a skip with the reason (a failure on CI, which must have one)."
    b = find_browser()
    if b is None:
        if os.environ.get('CI', '').lower() == 'true':
            pytest.fail('CI=true but no Chromium/Chrome is installed: .ci/run installs it (apt-get install -y chromium).')
        pytest.skip('no Chromium/Chrome found (apt-get install chromium, or set SEQCIRCUITS_BROWSER): the views are not rendered')
    return b


def assert_view_rendered(dom, heads):
    "circuitsvis has drawn the view: its head selector, a thumbnail per head and the zoomed pattern."
    assert 'Head Selector' in dom, dom[:2000]
    assert dom.count('<canvas') >= len(heads) + 1
    for h in heads: assert re.search(rf'<h4[^>]*>{re.escape(h)}</h4>', dom), h


def test_view_renders_offline_in_a_browser(organism_model, tmp_path):
    b = browser()
    cfg = organism_model.cfg
    heads = ['0.0', f'{cfg.n_layers - 1}.{cfg.n_heads - 1}']  # the first head and the last
    view = attention_view(organism_model, make_prompts(organism_model, 'months', 'born', n_prompts=8), heads)
    page = view.save(tmp_path/'view.html')
    assert offline_problems(page.read_text()) == []
    assert_view_rendered(browser_dom(page, b), heads)


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__(); self.refs = []
    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ('src', 'href') and v: self.refs.append((tag, v))


@pytest.fixture(scope='module')
def report(tmp_path_factory):
    "A small study with every stage (two tasks, one template): its index.html."
    from seqcircuits.study import run_study, StudySettings
    from seqcircuits.report import STAGES, write_report
    settings = StudySettings(tasks=('numerals', 'months'), templates=('born',), n_prompts=64)
    return write_report(run_study(settings, tmp_path_factory.mktemp('study'), STAGES, progress=False))


def report_refs(index):
    p = _Refs(); p.feed(index.read_text())
    return p.refs


@pytest.mark.slow  # a whole (small) study
def test_report_sections_open_offline(report):
    page = report.read_text()
    for text in ('OV scores: copy and successor heads', 'Attention from the final position', 'Successor heads',
                 'Attention patterns across tasks', 'Interactive: heads'):
        assert text in page, text
    assert offline_problems(page) == []
    refs = report_refs(report)
    assert refs, 'the report references no files'
    for tag, ref in refs:
        assert not re.match(r'(https?:)?//', ref), (tag, ref)  # no http(s) address in any script, link, img or iframe
        assert (report.parent/ref).is_file(), (tag, ref)
    views = [report.parent/ref for tag, ref in refs if tag == 'iframe']
    assert len(views) == 2
    for v in views: assert offline_problems(v.read_text()) == []


@pytest.mark.slow  # a whole (small) study
def test_report_views_render_in_a_browser(report):
    b = browser()
    assert 'Successor heads' in browser_dom(report, b)
    views = [report.parent/ref for tag, ref in report_refs(report) if tag == 'iframe']
    for v in views:
        heads = re.search(r'attention of heads ([\d. ]+)<', v.read_text()).group(1).split()
        assert_view_rendered(browser_dom(v, b), heads)
