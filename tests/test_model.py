"""Loading models: the bundled organism offline, saved folders, and clear errors for everything that cannot load."""
import json, os, shutil, time

import pytest
import torch

from seqcircuits.model import load_model, save_model, organism_dir, config_fingerprint, ModelUnavailableError
from conftest import ORGANISM_MAX_BYTES


def test_organism_loads_offline_with_its_tokenizer(organism_model, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    m = load_model('organism')
    assert config_fingerprint(m.cfg) == config_fingerprint(organism_model.cfg)
    assert len(m.tokenizer) <= m.cfg.d_vocab
    assert m.to_str_tokens(' January February', prepend_bos=False) == ['January', 'February']
    size = sum(p.stat().st_size for p in organism_dir().iterdir())
    assert size < ORGANISM_MAX_BYTES, f'the organism is {size/2**20:.1f} MiB; keep it under {ORGANISM_MAX_BYTES / 2**20:.0f} MiB'


def test_pretrained_name_fails_fast_offline(monkeypatch, empty_hub_cache):
    "Offline, with a Hugging Face cache that does not hold the model (conftest's empty_hub_cache): one clear line at once."
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    t0 = time.time()
    with pytest.raises(ModelUnavailableError, match='Cannot download the weights') as e:
        load_model('gpt2-small')
    assert time.time() - t0 < 10
    assert 'hf_model_path' in str(e.value) and "load_model('organism')" in str(e.value)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown model 'gpt-7'.*organism.*gpt2-small"):
        load_model('gpt-7')


def test_saved_folder_round_trip_and_mismatches(organism_model, tmp_path):
    organism = organism_model
    d = save_model(organism, tmp_path/'m')
    back = load_model(d)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in organism.state_dict().items())
    toks = organism.to_tokens('Bob born in March.')
    assert torch.equal(back.to_tokens('Bob born in March.'), toks)
    # weights that do not match the config
    cfg = json.loads((d/'config.json').read_text())
    bad = tmp_path/'bad_weights'; shutil.copytree(d, bad)
    (bad/'config.json').write_text(json.dumps(cfg | {'d_mlp': cfg['d_mlp'] * 2}))
    with pytest.raises(ValueError, match='do not match its config.json'):
        load_model(bad)
    # a tokenizer larger than the model's vocabulary
    small = tmp_path/'bad_tok'; shutil.copytree(d, small)
    (small/'config.json').write_text(json.dumps(cfg | {'d_vocab': 5, 'd_vocab_out': 5}))
    with pytest.raises(ValueError, match='tokenizer .* has .* tokens but the model'):
        load_model(small)


def test_cuda_without_gpu_is_an_error():
    if torch.cuda.is_available(): pytest.skip('a GPU is present')
    with pytest.raises(RuntimeError, match='no CUDA GPU'):
        load_model(device='cuda')
