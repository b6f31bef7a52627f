"""The pretrained-model path, offline: `load_model('gpt2-small')` through TransformerLens's real loading and conversion
code from a Hugging Face cache (the GPT-2 stand-in of gpt2_standin.py), larger names and their configs, the errors
where nothing can be loaded, `seqcircuits run --model gpt2-small` end to end, and every notebook's `hub` cells."""
import json, os, re, subprocess, sys, time
from pathlib import Path

import pytest
import torch

from gpt2_standin import CONFIG, LARGER_CONFIGS, PUBLISHED_PARAMS, REPO, _repo_dir
from seqcircuits.model import (load_model, model_config, load_tokenizer, weights_bytes, cached_snapshot, official_name,
                               ModelUnavailableError)

ROOT = Path(__file__).resolve().parents[1]


def test_cache_has_the_hub_layout(gpt2_hf_home):
    repo = _repo_dir(gpt2_hf_home, REPO)
    rev = (repo/'refs'/'main').read_text()
    snap = repo/'snapshots'/rev
    names = sorted(p.name for p in snap.iterdir())
    assert names == ['config.json', 'generation_config.json', 'merges.txt', 'model.safetensors', 'tokenizer.json',
                     'tokenizer_config.json', 'vocab.json']
    for p in snap.iterdir():  # each entry a link into blobs/, named by its content's hash, as the hub client writes
        if p.is_symlink(): assert p.resolve().parent == (repo/'blobs').resolve()
    assert json.loads((snap/'config.json').read_text())['architectures'] == ['GPT2LMHeadModel']
    from safetensors import safe_open
    with safe_open(str(snap/'model.safetensors'), 'pt') as f:
        keys = set(f.keys())
    assert {'wte.weight', 'wpe.weight', 'h.0.attn.c_attn.weight', 'ln_f.bias'} <= keys  # GPT2Model's names, no prefix


def test_load_gpt2_small_from_the_cache(hub_cache):
    "The real TransformerLens path: HF config -> TL config, HF weights -> TL weights (fold_ln, centring), GPT-2's tokenizer."
    assert cached_snapshot('gpt2-small') is not None
    t0 = time.time()
    model = load_model('gpt2-small')
    assert time.time() - t0 < 120
    cfg = model.cfg
    assert (cfg.model_name, cfg.original_architecture, cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_vocab) == \
        ('gpt2', 'GPT2LMHeadModel', CONFIG['n_layer'], CONFIG['n_head'], CONFIG['n_embd'], 50257)
    assert model.to_tokens(' Bob was born in March.', prepend_bos=False).tolist() == [[5811, 373, 4642, 287, 2805, 13]]
    assert model.to_tokens(' January').tolist() == [[50256, 3269]]  # BOS prepended, as for the real GPT-2
    # the converted model computes what the Hugging Face model computes (TransformerLens centres the unembedding, so
    # logits agree up to a constant per position: compare log-probabilities)
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(REPO).eval()
    toks = model.to_tokens(['Van done in 1. Hat done in 2. Road done in 3. Tree done in 4. Car done in'])
    with torch.no_grad():
        ours, theirs = model(toks).log_softmax(-1), hf(toks).logits.log_softmax(-1)
    assert (ours - theirs).abs().max() < 1e-4
    assert model.tokenizer.decode(ours[0, -1].argmax()) == ' 5'  # and the stand-in does the task
    assert model_config('gpt2-small').n_layers == cfg.n_layers
    assert weights_bytes(cfg) == sum(p.numel() * p.element_size() for p in model.parameters())
    assert load_tokenizer('gpt2-small').encode(' January', add_special_tokens=False) == [3269]


def test_hf_model_path_loads_a_local_copy(gpt2_hf_home, hub_cache):
    snap = cached_snapshot('gpt2-small')
    model = load_model('gpt2-small', hf_model_path=snap)
    assert model.cfg.n_layers == CONFIG['n_layer'] and model.to_tokens(' May', prepend_bos=False).tolist() == [[1737]]


def test_hf_model_path_still_needs_the_config_by_name(gpt2_hf_home, empty_hub_cache):
    "TransformerLens reads the model's config by its hub name even with a local copy: offline with an empty cache that\
    is the one-line error, not a traceback from deep inside the Hugging Face libraries."
    snap = next((gpt2_hf_home/'hub'/'models--gpt2'/'snapshots').iterdir())
    with pytest.raises(ModelUnavailableError, match="Cannot download the weights of 'gpt2-small'"):
        load_model('gpt2-small', hf_model_path=snap)


@pytest.mark.parametrize('name', ['gpt2-medium', 'gpt2-large', 'gpt2-xl', 'pythia-160m', 'gpt-neo-125M'])
def test_larger_names_resolve_to_their_configs(hub_cache, name):
    "Names resolve to TransformerLens's official repositories; their configs (config.json only in the cache) convert to the\
    published shapes and sizes; without weights in the cache, loading stops at once with the one-line error."
    repo = official_name(name)
    assert repo in LARGER_CONFIGS
    hf = LARGER_CONFIGS[repo]
    cfg = model_config(name, device='cpu')
    n_layers = hf.get('n_layer', hf.get('num_hidden_layers', hf.get('num_layers')))
    d_model = hf.get('n_embd', hf.get('hidden_size'))
    assert (cfg.n_layers, cfg.d_model, cfg.d_vocab) == (n_layers, d_model, hf['vocab_size'])
    assert cfg.original_architecture == hf['architectures'][0]
    # TransformerLens unties the unembedding (and gives it a bias): published count + what tying saved
    tied = 0 if repo.startswith('EleutherAI/pythia') else cfg.d_vocab * cfg.d_model
    assert abs(weights_bytes(cfg) / 4 - (PUBLISHED_PARAMS[repo] + tied)) / PUBLISHED_PARAMS[repo] < 0.01
    assert cached_snapshot(name) is None  # a config is not a model
    with pytest.raises(ModelUnavailableError):
        load_tokenizer(name)  # nor is a tokenizer class without its vocabulary
    t0 = time.time()
    with pytest.raises(ModelUnavailableError, match=f"Cannot download the weights of '{name}' \\({re.escape(repo)} on"):
        load_model(name)
    assert time.time() - t0 < 10


def test_nothing_cached_fails_fast_in_one_line(empty_hub_cache):
    t0 = time.time()
    with pytest.raises(ModelUnavailableError) as e:
        load_model('gpt2-small')
    assert time.time() - t0 < 10
    msg = str(e.value)
    assert '\n' not in msg and str(empty_hub_cache) in msg and 'HF_HOME' in msg and "load_model('organism')" in msg, msg


def test_missing_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="The model folder .* does not exist"):
        load_model(tmp_path/'nothing-here')
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path/'nothing-here'))
    (tmp_path/'f').write_text('x')
    with pytest.raises(NotADirectoryError, match='is a file, not a model folder'):
        load_model(tmp_path/'f')
    with pytest.raises(ValueError, match="Unknown model 'gpt-7'"):
        load_model('gpt-7')


# --- `seqcircuits run --model gpt2-small`, offline, on the stand-in
# two tasks (numerals and month names) keep CI short; the compare stage still compares them
GPT2_ARGS = ['run', '--model', 'gpt2-small', '--tasks', 'numerals', 'months', '--templates', 'born', 'lost', 'done',
             '--n-prompts', '96']


def test_cli_runs_the_whole_study_on_gpt2_small_offline(hub_env, tmp_path):
    out = tmp_path/'gpt2-report'
    t0 = time.time()
    r = subprocess.run([sys.executable, '-m', 'seqcircuits.cli', *GPT2_ARGS, '--out', str(out)], env=hub_env,
                       capture_output=True, text=True, timeout=900)
    seconds = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Memory plan for gpt2-small on cpu' in r.stderr and ': fits.' in r.stderr, r.stderr[:2000]
    html = (out/'index.html').read_text()
    assert 'gpt2-small' in html and 'Circuit on other task' in html
    for t in ('numerals', 'months'):
        kept = json.loads((out/t/'prompts'/'done.json').read_text())['summary']
        assert kept['n_kept'] == kept['n_wanted'], kept  # GPT-2 tokenization, the model's own filter keeps every prompt wanted
        assert kept['n_pos'] == 24
        ko = json.loads((out/t/'knockout'/'circuit.json').read_text())
        assert ko['score'] >= 0.8 and ko['model'] == 'gpt2'
        assert (out/t/'edges'/'graph.png').stat().st_size > 1000
    print(f"\nseqcircuits run --model gpt2-small (stand-in, offline): {seconds:.0f} s")


def test_cli_refuses_a_study_that_cannot_fit(hub_cache, tmp_path, monkeypatch, capsys):
    "The memory plan is checked before anything loads: one line of plan, one line of error, exit status 2."
    import seqcircuits.cost
    from seqcircuits.cli import main
    monkeypatch.setattr(seqcircuits.cost, 'available_memory', lambda device: 2**20)
    rc = main([*GPT2_ARGS, '--out', str(tmp_path/'out')])
    err = capsys.readouterr().err
    assert rc == 2 and err.count('\n') == 2, err
    assert 'Memory plan for gpt2-small' in err and 'The study needs about' in err, err
    assert not (tmp_path/'out').exists()


# --- every notebook's `hub` cells, against the stand-in. The rest of each notebook runs under nbdev_test already, so
# only what the hub cells build on runs with them: the exported code and the imports (cells flagged export, exporti
# or hide). A hub cell therefore uses only those and what earlier hub cells computed. Cells flagged `gpt2` need the
# real GPT-2 small and are skipped, as are `slow` and `cuda` cells.
HUB_NOTEBOOKS = sorted(p.name for p in (ROOT/'nbs').glob('*.ipynb') if '#| hub' in p.read_text())
RUN_HUB_CELLS = """
import sys, warnings
from pathlib import Path
from execnb.nbio import read_nb
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory
from nbdev.config import get_config
from nbdev.process import extract_directives
fn = Path(sys.argv[1])
skip_flags = set(get_config().get('tst_flags', '').split()) - {'hub'}
ran = []
def skip(cell):
    if cell.cell_type != 'code': return True
    d = extract_directives(cell, remove=False)
    if d.get('eval:', [''])[0].lower() == 'false' or skip_flags & d.keys(): return True
    if 'hub' in d: ran.append(cell)
    return not ({'export', 'exporti', 'hide', 'hub'} & d.keys())
shell = CaptureShell(fn)
shell.run("import warnings; warnings.filterwarnings('ignore', message='HookedTransformer')")
with working_directory(fn.parent): shell.run_all(read_nb(fn), exc_stop=True, preproc=skip)
print(f'{fn.name}: {len(ran)} hub cells ran')
"""


def test_hub_notebooks_found():
    assert {'01_model.ipynb', '08_knockout.ipynb', '09_path_patching.ipynb'} <= set(HUB_NOTEBOOKS), HUB_NOTEBOOKS


@pytest.mark.parametrize('nb', HUB_NOTEBOOKS)
def test_notebook_hub_cells_run_on_the_standin(hub_env, nb):
    r = subprocess.run([sys.executable, '-c', RUN_HUB_CELLS, str(ROOT/'nbs'/nb)], env=hub_env, capture_output=True,
                       text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    n = sum(1 for c in json.loads((ROOT/'nbs'/nb).read_text())['cells']
            if c['cell_type'] == 'code' and ''.join(c['source']).startswith('#| hub'))
    assert f'{nb}: {n} hub cells ran' in r.stdout, r.stdout


def test_cli_refuses_an_architecture_path_patching_cannot_handle(hub_cache, tmp_path, capsys):
    "Pythia's parallel attention and MLP: refused from its config alone, before any weights are needed."
    from seqcircuits.cli import main
    rc = main(['run', '--model', 'pythia-160m', '--n-prompts', '48', '--quiet', '--out', str(tmp_path/'out')])
    err = capsys.readouterr().err
    assert rc == 2 and err.count('\n') == 1 and 'parallel_attn_mlp' in err and 'edges stage' in err, err
