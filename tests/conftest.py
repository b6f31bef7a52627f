"""Fixtures and settings shared by the tests: the bundled organism (loaded once per session), a small random model with
its prompts and circuit (`make_rand3`), the `slow` marker, and the
GPT-2 stand-in's Hugging Face cache (built once, kept in pytest's cache folder between sessions)."""
import os, sys
from pathlib import Path

import pytest

from seqcircuits.model import load_model, organism_dir

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path: sys.path.insert(0, str(TESTS))

ORGANISM_MAX_BYTES = 8 * 2**20  # the bundled organism's files stay under 8 MiB: it ships inside the package


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: takes minutes of CPU (whole studies through the command line); '
                                       'deselect with -m "not slow"')


def make_rand3(**label_kw):
    """A random 3-layer model (4 heads of d_head 8), 10 prompts of random tokens labelled by the model's own predictions
    (`label_kw` goes to `model_labelled_prompts`), and a 7-node circuit over all three layers: for exact comparisons."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from seqcircuits.core import Circuit
    from seqcircuits.model import config_fingerprint
    from seqcircuits.data import model_labelled_prompts
    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_mlp=64, d_vocab=40,
                                  act_fn='gelu', normalization_type='LN', seed=1)
    model = HookedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    prompts = model_labelled_prompts(model, torch.randint(0, 40, (10, 7), generator=g),
                                     torch.randint(0, 40, (10, 7), generator=g), **label_kw)
    return model, prompts, Circuit.from_names('0.1 MLP0 1.2 MLP1 2.1 2.3 MLP2', config_hash=config_fingerprint(cfg))


@pytest.fixture(scope='session')
def organism_model():
    "The bundled model organism, loaded once for every test that needs it (skipped where it is not bundled)."
    if not (organism_dir()/'model.safetensors').exists(): pytest.skip('the model organism is not bundled')
    return load_model()


@pytest.fixture(scope='session')
def gpt2_hf_home(request, tmp_path_factory) -> Path:
    "An HF_HOME whose cache holds the GPT-2 stand-in (see gpt2_standin.py): built on first use (about a minute), then\
    reused from pytest's cache folder until the builder or the tokenizer files change."
    from gpt2_standin import build_hf_home
    cache = getattr(request.config, 'cache', None)  # None under `-p no:cacheprovider`: build in a temporary folder
    base = cache.mkdir('gpt2-standin') if cache is not None else tmp_path_factory.mktemp('gpt2-standin')
    return build_hf_home(base)


@pytest.fixture
def hub_env(gpt2_hf_home) -> dict:
    "Environment for a subprocess that must see the stand-in's cache, and only it: HF_HOME set, the hub offline."
    env = {k: v for k, v in os.environ.items() if k not in ('HF_HUB_CACHE', 'TRANSFORMERS_CACHE', 'HUGGINGFACE_HUB_CACHE')}
    path = os.pathsep.join([str(ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    return env | {'HF_HOME': str(gpt2_hf_home), 'HF_HUB_OFFLINE': '1', 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': '1',
                  'PYTHONUNBUFFERED': '1', 'PYTHONPATH': path}


@pytest.fixture
def hub_cache(gpt2_hf_home, monkeypatch) -> Path:
    "In this process: the Hugging Face libraries read the stand-in's cache, offline (what HF_HOME and HF_HUB_OFFLINE=1 do\
    for a new process; the libraries read those variables once, when they are imported)."
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(gpt2_hf_home/'hub'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    return gpt2_hf_home/'hub'


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    "In this process: an empty Hugging Face cache, offline (a machine that never downloaded anything)."
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    return tmp_path
