"""Issue 10: a study folder never loses a user's files, never mixes two runs, never resumes stale results; every
algorithm refuses NaN, foreign prompts and meaningless thresholds with one clear line. One test (or group) per item."""
import json, math, os, shutil, signal, subprocess, sys, time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from seqcircuits.core import Circuit, PromptSet, Node
from seqcircuits.model import load_model, save_model, random_model, organism_dir
from seqcircuits.data import make_prompts, filter_prompts, word_tokenizer, WORD_SPECIALS
from seqcircuits.knockout import find_circuit, drop_table, KNOCKOUT_STAGE
from seqcircuits.patching import find_edges
from seqcircuits.study import StudySettings, Study, Stage, run_study, PROMPTS_STAGE
from seqcircuits.cli import main
from test_study import results  # every result file of a study, as text (done.json minus its time)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'MPLBACKEND': 'Agg', 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1',
       'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
SMALL = StudySettings(tasks=('numerals',), templates=('done',), n_prompts=64)
STAGES = [PROMPTS_STAGE, KNOCKOUT_STAGE]
TINY = ['run', '--tasks', 'numerals', '--templates', 'done', '--n-prompts', '64', '--quiet']


@pytest.fixture(scope='module')
def organism():
    return load_model()

@pytest.fixture(scope='module')
def ps(organism):
    return filter_prompts(organism, make_prompts(organism, 'numerals', 'done', n_prompts=64))[0]

def tree(d: Path) -> dict:
    "Every file under `d` with its bytes."
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()}

def run_main(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# --- 1. --overwrite removes only what the study wrote ------------------------------------------------------------
def test_1_overwrite_keeps_user_files(organism, tmp_path):
    out = tmp_path/'study'
    run_study(SMALL, out, STAGES, model=organism, progress=False)
    (out/'notes.txt').write_text('my notes')
    (out/'mine').mkdir(); (out/'mine'/'fig.png').write_bytes(b'\x89PNG mine')
    (out/'numerals'/'knockout'/'remarks.md').write_text('a remark beside the circuit')
    with pytest.raises(FileExistsError, match='other settings'):
        run_study(replace(SMALL, threshold=0.7), out, STAGES, model=organism, progress=False)
    run_study(replace(SMALL, threshold=0.7), out, STAGES, model=organism, progress=False, overwrite=True)
    assert (out/'notes.txt').read_text() == 'my notes' and (out/'mine'/'fig.png').read_bytes() == b'\x89PNG mine'
    assert (out/'numerals'/'knockout'/'remarks.md').read_text() == 'a remark beside the circuit'
    assert json.loads((out/'settings.json').read_text())['threshold'] == 0.7
    assert Circuit.from_json(out/'numerals'/'knockout'/'circuit.json').threshold == 0.7


def test_1_overwrite_refuses_a_folder_that_is_not_a_study(tmp_path, capsys):
    d = tmp_path/'experiment'; d.mkdir()
    (d/'settings.json').write_text(json.dumps({'lr': 0.1, 'epochs': 3}))
    (d/'data.csv').write_text('a,b\n1,2\n')
    before = tree(d)
    rc, out, err = run_main([*TINY, '--out', d, '--overwrite'], capsys)
    assert rc == 2 and err.count('\n') == 1 and 'not a seqcircuits study' in err, err
    assert tree(d) == before


# --- 2. --out into an unrelated folder never deletes or replaces anything ------------------------------------------
def test_2_out_into_unrelated_folder_is_refused(tmp_path, capsys):
    d = tmp_path/'website'
    (d/'numerals'/'knockout').mkdir(parents=True)
    (d/'numerals'/'knockout'/'slides.txt').write_text('my slides')
    (d/'index.html').write_text('<h1>my homepage</h1>')
    before = tree(d)
    rc, out, err = run_main([*TINY, '--out', d], capsys)
    assert rc == 2 and err.count('\n') == 1 and 'not a seqcircuits study' in err, err
    assert tree(d) == before


# --- 3. two runs on one folder at once: the second says who holds it and exits 2 ----------------------------------
WAITER = """import sys, time, pathlib
from seqcircuits.cli import main
go = pathlib.Path(sys.argv[1])
while not go.exists(): time.sleep(0.02)
sys.exit(main(sys.argv[2:]))
"""

@pytest.mark.slow  # three processes, each importing torch
def test_3_concurrent_runs_are_refused_by_the_lock(tmp_path, capsys):
    out, go = tmp_path/'study', tmp_path/'go'
    start = lambda *a: subprocess.Popen([sys.executable, *a], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a = start('-m', 'seqcircuits.cli', *TINY, '--out', str(out))
    # two more real processes, already imported, that start their run the moment `go` appears
    b = start('-c', WAITER, str(go), *TINY, '--threshold', '0.5', '--out', str(out))
    c = start('-c', WAITER, str(go), *TINY, '--out', str(out))
    lock = out/'study.lock'
    t0 = time.time()
    while a.poll() is None and time.time() - t0 < 600:
        if lock.exists() and lock.read_text().strip() == str(a.pid): break
        time.sleep(0.02)
    go.touch()
    outs = {k: p.communicate(timeout=600) for k, p in (('a', a), ('b', b), ('c', c))}
    assert a.returncode == 0, outs['a'][1]
    for k, p in (('b', b), ('c', c)):
        err = outs[k][1]
        assert p.returncode == 2 and err.count('\n') == 1, err
        assert 'another seqcircuits run' in err and f'pid {a.pid}' in err, err
    # the folder holds one study: the settings say what the results are
    assert json.loads((out/'settings.json').read_text())['threshold'] == 0.8
    for stage in ('knockout', 'edges'):
        assert Circuit.from_json(out/'numerals'/stage/'circuit.json').threshold == 0.8
    assert not list(out.rglob('*.partial'))
    # the lock went with the process: the same command now resumes
    rc, _, err = run_main([*TINY, '--out', out], capsys)
    assert rc == 0, err


def test_3_a_stale_lock_of_a_dead_process_is_taken_over(organism, tmp_path):
    out = tmp_path/'study'
    p = subprocess.Popen([sys.executable, '-c', 'pass']); p.wait()
    run_study(SMALL, out, [PROMPTS_STAGE], model=organism, progress=False)
    (out/'study.lock').write_text(str(p.pid))  # a run that died
    run_study(SMALL, out, STAGES, model=organism, progress=False)
    assert Study(out, SMALL).is_done('knockout', 'numerals')


# --- 4. other weights in the same folder ---------------------------------------------------------------------------
def test_4_changed_weights_are_not_resumed(organism, tmp_path):
    m = save_model(organism, tmp_path/'m')
    st, out = replace(SMALL, model=str(m)), tmp_path/'study'
    run_study(st, out, STAGES, progress=False)
    changed = load_model(m)
    with torch.no_grad(): changed.blocks[-1].mlp.W_out.mul_(0.5)  # the last layer's MLP (the organism's only one)
    save_model(changed, m)
    with pytest.raises(FileExistsError, match='weights'):
        run_study(st, out, STAGES, progress=False)
    calls = []
    counted = Stage('knockout', lambda s, t, f: calls.append(t) or KNOCKOUT_STAGE.run(s, t, f))
    run_study(st, out, [PROMPTS_STAGE, counted], progress=False, overwrite=True)
    assert calls == ['numerals']
    from seqcircuits.model import weights_fingerprint
    assert json.loads((out/'numerals'/'knockout'/'done.json').read_text())['weights'] == weights_fingerprint(load_model(m))
    assert weights_fingerprint(load_model(m)) != weights_fingerprint(organism)


def test_4_weights_fingerprint(organism):
    from seqcircuits.model import weights_fingerprint
    import copy
    fp = weights_fingerprint(organism)
    other = copy.deepcopy(organism)
    assert weights_fingerprint(other) == fp
    with torch.no_grad(): other.blocks[0].attn.W_Q[0, 0, 0] += 1e-3
    assert weights_fingerprint(other) != fp


# --- 5. NaN anywhere: a clear error naming where -------------------------------------------------------------------
def test_5_nan_in_the_model(organism, ps):
    import copy
    bad = copy.deepcopy(organism)
    with torch.no_grad(): bad.blocks[1].mlp.W_out[0, 0] = float('nan')
    for f in (lambda: find_circuit(bad, ps, progress=False), lambda: drop_table(bad, ps, progress=False)):
        with pytest.raises(ValueError, match='NaN') as e: f()
        assert 'logits' in str(e.value) or 'ablation' in str(e.value), e.value

def test_5_nan_in_the_ablation(organism, ps):
    from seqcircuits.ablation import compute_ablation
    abl = compute_ablation(organism, ps)
    abl.values['blocks.0.attn.hook_z'][3, 0, 0] = float('nan')  # position 3, head 0.0
    circuit = find_circuit(organism, ps, progress=False)
    for f in (lambda: find_circuit(organism, ps, ablation=abl, progress=False),
              lambda: drop_table(organism, ps, ablation=abl, progress=False),
              lambda: find_edges(organism, ps, circuit, ablation=abl, progress=False)):
        with pytest.raises(ValueError, match=r'NaN.*blocks\.0\.attn\.hook_z'): f()

def test_5_nan_metric(organism, ps):
    from seqcircuits.metrics import LogitDiff
    class Broken(LogitDiff):
        def per_prompt(self, logits, prompts, reference=None):
            v = super().per_prompt(logits, prompts, reference); v[0] = float('nan'); return v
    with pytest.raises(ValueError, match='NaN'):
        find_circuit(organism, ps, metric=Broken(), progress=False)


# --- 6. prompts made for another vocabulary ------------------------------------------------------------------------
def test_6_prompts_for_another_vocabulary_are_refused(organism, ps):
    from transformer_lens import HookedTransformerConfig
    from seqcircuits.ablation import compute_ablation
    big = random_model(HookedTransformerConfig(n_layers=2, n_heads=4, d_model=32, d_head=8, d_mlp=64, d_vocab=1000,
                                               n_ctx=64, act_fn='gelu', normalization_type='LN'))
    words = [w for w, i in sorted(organism.tokenizer.get_vocab().items(), key=lambda x: x[1]) if w not in WORD_SPECIALS]
    tok = word_tokenizer(words[::-1])  # the same words with other ids
    same_size = random_model(HookedTransformerConfig(n_layers=2, n_heads=4, d_model=32, d_head=8, d_mlp=64, d_vocab=len(tok),
                                                     n_ctx=64, act_fn='gelu', normalization_type='LN'), tokenizer=tok)
    assert len(same_size.tokenizer) == len(organism.tokenizer)
    circuit = Circuit.from_names('0.0 1.3 MLP0')
    for model in (big, same_size):
        for f in (lambda: find_circuit(model, ps, progress=False), lambda: drop_table(model, ps, progress=False),
                  lambda: compute_ablation(model, ps), lambda: filter_prompts(model, ps),
                  lambda: find_edges(model, ps, circuit, progress=False)):
            with pytest.raises(ValueError, match='another tokenizer|vocabulary') as e: f()
            assert str(e.value).count('\n') == 0
    back = PromptSet.from_json(ps.to_json())
    assert back.vocab_hash == ps.vocab_hash != ''


# --- 7. start circuits and full metrics that cannot give a meaningful circuit ---------------------------------------
def test_7_empty_or_too_weak_start_is_refused(organism, ps):
    with pytest.raises(ValueError, match='start'):
        find_circuit(organism, ps, start=[], progress=False)
    with pytest.raises(ValueError, match='below the threshold'):
        find_circuit(organism, ps, start=['1.0'], progress=False)  # without head 0.0 the organism keeps far below 80%

def test_7_full_metric_near_zero_is_refused(organism, ps):
    from seqcircuits.core import concat_prompts
    swapped = replace(ps, answer=ps.wrong, wrong=ps.answer)
    weak = concat_prompts([ps, swapped, ps[:2]])  # per-prompt logit differences +x, -x: the mean is nearly 0
    with pytest.raises(ValueError, match='too close to zero'):
        find_circuit(organism, weak, progress=False)


# --- 8. find_edges' threshold: the same rule as find_circuit -----------------------------------------------------
@pytest.mark.parametrize('bad', [1.5, 100, 0, -1, float('nan'), True, '0.8'])
def test_8_find_edges_threshold_range(organism, ps, bad):
    circuit = find_circuit(organism, ps, progress=False)
    with pytest.raises(ValueError, match=r'threshold must be in \(0, 1\]') as e1:
        find_edges(organism, ps, circuit, threshold=bad, progress=False)
    with pytest.raises(ValueError) as e2:
        find_circuit(organism, ps, threshold=bad, progress=False)
    assert str(e1.value) == str(e2.value)


# --- 9. damaged stage files are named and recomputed -----------------------------------------------------------
def test_9_damaged_stage_files_are_named_and_recomputed(tmp_path, capsys):
    out = tmp_path/'study'
    rc, _, err = run_main([*TINY, '--out', out], capsys)
    assert rc == 0, err
    good = results(out)
    (out/'numerals'/'knockout'/'circuit.json').unlink()
    (out/'numerals'/'edges'/'done.json').write_text('{"stage": "ed')
    csv = out/'numerals'/'drops'/'drops_from_full.csv'; csv.write_text(csv.read_text()[:40])
    (out/'settings.json').write_text('{"model": "organ')
    rc, _, err = run_main([*TINY, '--out', out], capsys)
    assert rc == 0, err
    for what in ('numerals/knockout', 'circuit.json', 'numerals/edges', 'done.json', 'numerals/drops',
                 'drops_from_full.csv', 'settings.json'):
        assert what in err, (what, err)
    assert 'Traceback' not in err
    assert results(out) == good


def test_9_stages_that_read_a_changed_result_are_computed_again(organism, tmp_path):
    value, calls = {'x': 1}, []
    def run_a(study, task, folder): calls.append('a'); (folder/'a.txt').write_text(str(value['x'])); return {}
    def run_b(study, task, folder):
        calls.append('b'); (folder/'b.txt').write_text((study.stage_dir('a', task)/'a.txt').read_text()); return {}
    stages, out = [Stage('a', run_a), Stage('b', run_b)], tmp_path/'study'
    run_study(SMALL, out, stages, model=organism, progress=False)
    # a damaged, and computed again to the same result: b, which read it, is still valid
    (out/'numerals'/'a'/'a.txt').write_text('damaged'); calls.clear()
    with pytest.warns(UserWarning, match='numerals/a: a.txt changed'):  # a StudyWarning
        run_study(SMALL, out, stages, model=organism, progress=False)
    assert calls == ['a']
    # a damaged, and computed again to another result: b is computed again too
    (out/'numerals'/'a'/'a.txt').write_text('damaged'); calls.clear(); value['x'] = 2
    with pytest.warns(UserWarning, match='numerals/b: numerals/a, which it may read, changed'):
        run_study(SMALL, out, stages, model=organism, progress=False)
    assert calls == ['a', 'b'] and (out/'numerals'/'b'/'b.txt').read_text() == '2'


def test_9_damaged_manifest_is_named(tmp_path, capsys):
    out = tmp_path/'study'
    rc, _, err = run_main([*TINY, '--out', out], capsys)
    assert rc == 0, err
    (out/'study.json').write_text('{"files": ')
    rc, _, err = run_main([*TINY, '--out', out], capsys)
    assert rc == 2 and err.count('\n') == 1 and 'study.json' in err, err


# --- 10. garbage model folders and missing paths -----------------------------------------------------------------
def test_10_garbage_model_folder(organism, tmp_path, capsys):
    d = save_model(organism, tmp_path/'m')
    (d/'model.safetensors').write_bytes(b'this is not a safetensors file at all')
    with pytest.raises(ValueError, match=r'model\.safetensors.*not a safetensors file'): load_model(d)
    rc, _, err = run_main([*TINY, '--model', d, '--out', tmp_path/'o1'], capsys)
    assert rc == 2 and err.count('\n') == 1 and 'model.safetensors' in err, err
    d = save_model(organism, tmp_path/'m2')
    (d/'config.json').write_text('{"n_layers": 2,')
    with pytest.raises(ValueError, match=r'config\.json.*not valid JSON'): load_model(d)
    (d/'config.json').write_text(json.dumps({'n_layers': 2, 'd_model': 8, 'n_ctx': 8, 'd_head': 2, 'd_vocab': 10,
                                             'act_fn': 'relu', 'colour': 'red'}))
    with pytest.raises(ValueError, match=r"config\.json.*colour"): load_model(d)

def test_10_missing_model_path(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_model(tmp_path/'nowhere')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_model(str(tmp_path/'nowhere'))
    rc, _, err = run_main([*TINY, '--model', tmp_path/'nowhere', '--out', tmp_path/'o'], capsys)
    assert rc == 2 and err.count('\n') == 1 and 'does not exist' in err, err


# --- 11. smaller ones ---------------------------------------------------------------------------------------------
def test_11_zero_position_prompt_set():
    with pytest.raises(ValueError, match='token'):
        PromptSet.from_tensors(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), [1, 2], [2, 3])

def test_11_keep_as_one_string(organism, ps):
    c = find_circuit(organism, ps, keep='0.0', progress=False)
    assert Node.attn_head(0, 0) in c and c.meta['keep'] == ['0.0']

@pytest.mark.parametrize('n', ['64', 8.0, True])
def test_11_n_prompts_must_be_a_whole_number(organism, n):
    with pytest.raises(ValueError, match='n_prompts must be a whole number'): make_prompts(organism, 'numerals', n_prompts=n)
    with pytest.raises(ValueError, match='n_prompts must be a whole number'): StudySettings(n_prompts=n)

def test_11_unknown_names_list_the_valid_ones(organism, ps):
    from seqcircuits.ablation import compute_ablation
    with pytest.raises(ValueError, match=r"Unknown ablation 'meen'.*'mean', 'zero', 'resample'"):
        compute_ablation(organism, ps, 'meen')
    with pytest.raises(ValueError, match=r"Unknown corruption 'shuffle'.*'random', 'repeat_last'"):
        make_prompts(organism, 'numerals', n_prompts=8, corruption='shuffle')
    circuit = Circuit.from_names('0.0 1.3 MLP0 MLP1')
    with pytest.raises(ValueError, match=r"Unknown score form 'ratios'.*'ratio', 'normalized'"):
        find_edges(organism, ps, circuit, score_form='ratios', progress=False)

@pytest.mark.parametrize('bs', [0, -3])
def test_11_batch_size_must_be_positive(organism, ps, bs):
    with pytest.raises(ValueError, match='batch_size must be'): filter_prompts(organism, ps, batch_size=bs)

def test_11_unknown_dtype():
    with pytest.raises(ValueError, match=r"Unknown dtype 'foo'.*float32"): load_model(dtype='foo')

@pytest.mark.parametrize('change', [{'score': 'NaN'}, {'score': float('nan')}, {'threshold': 'high'}])
def test_11_circuit_json_checks_numbers(change):
    d = Circuit.from_names('0.1 MLP0', score=0.9, threshold=0.8).to_dict() | change
    with pytest.raises(ValueError, match='finite number'): Circuit.from_json(json.dumps(d))

@pytest.mark.parametrize('bad', [{'layer': 1, 'head': 0.5}, {'layer': 1.5, 'head': 0}, {'layer': True, 'head': 0}])
def test_11_circuit_json_checks_node_indices(bad):
    d = Circuit.from_names('0.1 MLP0').to_dict()
    d['nodes'][0] = {'kind': 'head', **bad}
    with pytest.raises(ValueError, match='whole number'): Circuit.from_json(json.dumps(d))

@pytest.mark.parametrize('dtype', [torch.bool, torch.uint8])
def test_11_bool_and_uint8_tokens_are_refused(dtype):
    t = torch.ones(2, 3, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype)):
        PromptSet.from_tensors(t, t, torch.ones(2, dtype=dtype), torch.zeros(2, dtype=dtype))

def test_11_failed_run_leaves_no_folder(tmp_path, capsys):
    out = tmp_path/'new'/'report'
    rc, _, err = run_main([*TINY, '--model', tmp_path/'nowhere', '--out', out], capsys)
    assert rc == 2 and not out.exists() and not out.parent.exists(), err
    empty = tmp_path/'empty'; empty.mkdir()
    rc, _, err = run_main([*TINY, '--model', tmp_path/'nowhere', '--out', empty], capsys)
    assert rc == 2 and empty.exists() and not list(empty.iterdir()), err

def test_11_run_help_shows_defaults(capsys):
    with pytest.raises(SystemExit): main(['run', '--help'])
    out = ' '.join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal's width
    for d in ('(default: 0.8)', '(default: 1536)', '(default: organism)', '(default: seqcircuits-report)'):
        assert d in out, out
