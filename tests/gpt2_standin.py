"""A stand-in for GPT-2 small in a Hugging Face cache, so that the pretrained-model path runs offline in the tests.

`build_hf_home(folder)` writes `folder/hub/models--gpt2/...` in the layout the Hugging Face hub's client writes when it
downloads `gpt2` (`refs/main` naming a snapshot, the snapshot's files linked to `blobs/`): `config.json`,
`generation_config.json`, `model.safetensors`, and the tokenizer files `vocab.json`, `merges.txt`, `tokenizer.json`,
`tokenizer_config.json`, made from GPT-2's real vocabulary and merges (`tests/data/gpt2-tokenizer`). With
`HF_HOME=folder` and `HF_HUB_OFFLINE=1`, `load_model('gpt2-small')` then runs TransformerLens's real GPT-2 loading
and conversion code on it.

The weights are not GPT-2's: they are a small GPT-2-architecture model (4 layers x 4 heads, d_model 64, GPT-2's
vocabulary and positions) trained here, in one to two minutes on one CPU thread, to continue the study's sequences
(numerals, number words, months, in every template) with the real GPT-2 tokenizer. So the whole study - the filter
included - runs through the GPT-2 path and GPT-2 tokenization. Nothing here is shipped or downloaded.

Run `python tests/gpt2_standin.py DIR` to build one by hand (then `HF_HOME=DIR HF_HUB_OFFLINE=1 seqcircuits run
--model gpt2-small ...`).
"""
from __future__ import annotations
import hashlib, json, os, shutil, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKENIZER_FILES = HERE/'data'/'gpt2-tokenizer'  # vocab.json, merges.txt (GPT-2's, byte-identical) and their LICENSE
REPO = 'gpt2'  # the Hugging Face repository TransformerLens loads for 'gpt2-small'

# The stand-in's shape: GPT-2's vocabulary, context and block design, small enough to train in one to two minutes.
CONFIG = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 50256,
    "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2", "n_ctx": 1024, "n_embd": 64, "n_head": 4, "n_layer": 4, "n_positions": 1024,
    "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": 50257,
}
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 50256, "eos_token_id": 50256}

# Config files (only) of larger models, with their published dimensions: enough to resolve their names, read their
# configs through TransformerLens's conversion and plan their memory offline. Without weights in the cache,
# load_model must refuse them with its one-line error.
_GPT2 = {k: v for k, v in CONFIG.items() if not k.startswith('n_')}
LARGER_CONFIGS = {
    'gpt2-medium': _GPT2 | {"n_ctx": 1024, "n_positions": 1024, "n_embd": 1024, "n_head": 16, "n_layer": 24},
    'gpt2-large': _GPT2 | {"n_ctx": 1024, "n_positions": 1024, "n_embd": 1280, "n_head": 20, "n_layer": 36},
    'gpt2-xl': _GPT2 | {"n_ctx": 1024, "n_positions": 1024, "n_embd": 1600, "n_head": 25, "n_layer": 48},
    'EleutherAI/pythia-160m': {
        "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
        "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 12, "num_hidden_layers": 12,
        "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
        "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304},
    'EleutherAI/gpt-neo-125M': {
        "activation_function": "gelu_new", "architectures": ["GPTNeoForCausalLM"], "attention_dropout": 0,
        "attention_layers": ["global", "local"] * 6, "attention_types": [[["global", "local"], 6]], "bos_token_id": 50256,
        "embed_dropout": 0, "eos_token_id": 50256, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": None,
        "layer_norm_epsilon": 1e-05, "max_position_embeddings": 2048, "model_type": "gpt_neo", "num_heads": 12,
        "num_layers": 12, "resid_dropout": 0, "vocab_size": 50257, "window_size": 256},
}
# their published parameter counts (Hugging Face, embeddings tied where the model ties them)
PUBLISHED_PARAMS = {'gpt2-medium': 354_823_168, 'gpt2-large': 774_030_080, 'gpt2-xl': 1_557_611_200,
                    'EleutherAI/pythia-160m': 162_322_944, 'EleutherAI/gpt-neo-125M': 125_198_592}
TOKENIZER_CONFIG = {"model_max_length": 1024}

TASKS = ('numerals', 'number_words', 'months')
TEMPLATES = ('pure', 'born', 'lost', 'done')
TRAIN = dict(steps=1200, batch_size=32, lr=3e-3, prompts_per_set=512, seed=0)


def build_key() -> str:
    "A hash of everything the stand-in is built from: a changed builder or tokenizer gives a new folder."
    import torch, transformers
    h = hashlib.sha1()
    for p in (Path(__file__), TOKENIZER_FILES/'vocab.json', TOKENIZER_FILES/'merges.txt'): h.update(p.read_bytes())
    h.update(f"{torch.__version__} {transformers.__version__}".encode())
    return h.hexdigest()


def _tokenizer_json(path: Path):
    "GPT-2's fast-tokenizer file (byte-level BPE, `<|endoftext|>` as its one special token), as the hub serves it."
    from tokenizers import Tokenizer, AddedToken, models, pre_tokenizers, processors, decoders
    tk = Tokenizer(models.BPE.from_file(str(TOKENIZER_FILES/'vocab.json'), str(TOKENIZER_FILES/'merges.txt')))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken('<|endoftext|>', special=True)])
    tk.save(str(path))


def _training_sets(tok, seed: int, n: int) -> list:
    "Clean prompts and answers of every task x template, with fillers drawn from seeds the study does not use."
    from seqcircuits.data import make_prompts
    return [make_prompts(tok, t, tp, n_prompts=n, seed=1000 + seed + i)
            for i, (t, tp) in enumerate((t, tp) for t in TASKS for tp in TEMPLATES)]


def train(tok, steps: int = TRAIN['steps'], batch_size: int = TRAIN['batch_size'], lr: float = TRAIN['lr'],
          prompts_per_set: int = TRAIN['prompts_per_set'], seed: int = TRAIN['seed'], log=None):
    """A GPT2LMHeadModel of shape `CONFIG` trained to continue the sequences. Two things make it fast: the loss is
    taken only where the next token is a member (members 2..4 and the answer), and only the embeddings of the tokens
    the prompts use are trained (a small table, written back into GPT-2's tied embedding matrix at the end; the other
    rows keep their random initialisation, so every logit of the full 50,257-token vocabulary stays meaningful)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**CONFIG))
    model.eval()  # no dropout: a deterministic, quickly converging run
    sets = _training_sets(tok, seed, prompts_per_set)
    used = torch.unique(torch.cat([torch.cat([s.clean.flatten(), s.corrupted.flatten(), s.answer, s.wrong]) for s in sets]))
    local = torch.full((CONFIG['vocab_size'],), -1, dtype=torch.long)
    local[used] = torch.arange(len(used))
    wte = model.transformer.wte.weight
    emb = torch.nn.Parameter(wte[used].detach().clone())  # the rows of `used`, tied: input embedding and unembedding
    wte.requires_grad_(False)
    params = [emb] + [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        ps = sets[step % len(sets)]
        i = torch.randint(ps.n_prompts, (batch_size,), generator=g)
        x = ps.clean[i]
        h = model.transformer(inputs_embeds=emb[local[x]]).last_hidden_state
        before = [p - 1 for p in ps.member_pos[1:]]  # positions whose next token is a member
        h = torch.cat([h[:, before].flatten(0, 1), h[:, -1]])
        y = torch.cat([x[:, list(ps.member_pos[1:])].flatten(), ps.answer[i]])
        loss = torch.nn.functional.cross_entropy(h @ emb.T, local[y])
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
        if log and (step % 100 == 0 or step == steps - 1): log(f"step {step}: loss {loss.item():.3f}")
    with torch.no_grad(): wte[used] = emb.detach()
    wte.requires_grad_(True)
    return model


def pass_rates(model, tok, n_prompts: int = 256) -> dict:
    "Per task x template: the fraction of the study's own prompt set (seed 0) that the filter keeps (balance aside)."
    import torch
    from seqcircuits.data import make_prompts, filter_prompts
    out = {}
    with torch.no_grad():
        for t in TASKS:
            for tp in TEMPLATES:
                ps = make_prompts(tok, t, tp, n_prompts=n_prompts, seed=0)
                kept, _ = filter_prompts(lambda x: model(x).logits, ps, balance=False)
                out[t, tp] = kept.n_prompts / ps.n_prompts
    return out


def _put(snapshot: Path, blobs: Path, name: str, write):
    "Write file `name` as the hub client does: content in blobs/<hash>, the snapshot entry a relative link to it."
    tmp = blobs/f'.{name}.tmp'
    write(tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    blob = blobs/digest
    tmp.replace(blob)
    link = snapshot/name
    try: link.symlink_to(os.path.relpath(blob, snapshot))
    except OSError: shutil.copyfile(blob, link)  # where links cannot be made, the client copies too


def _repo_dir(folder: Path, repo: str) -> Path:
    "The hub client's folder for model repository `repo` in the cache of HF_HOME `folder`."
    return folder/'hub'/('models--' + repo.replace('/', '--'))


def add_config_only(folder: Path, key: str):
    "Cache entries holding only config.json for the larger models of `LARGER_CONFIGS`."
    for repo, cfg in LARGER_CONFIGS.items():
        d = _repo_dir(folder, repo)
        if d.exists(): shutil.rmtree(d)
        snapshot, blobs = d/'snapshots'/key, d/'blobs'
        snapshot.mkdir(parents=True); blobs.mkdir()
        _put(snapshot, blobs, 'config.json', lambda p, c=cfg: p.write_text(json.dumps(c, indent=2) + '\n'))
        (d/'refs').mkdir(); (d/'refs'/'main').write_text(key)


def build_hf_home(folder: str | Path, log=None) -> Path:
    "Build the cache in `folder` (an HF_HOME) if it is not there yet; return `folder`."
    folder = Path(folder)
    repo = _repo_dir(folder, REPO)
    key = build_key()
    if (repo/'refs'/'main').exists() and (repo/'refs'/'main').read_text() == key: return folder
    t0 = time.time()
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same stand-in on every machine's CPU, and no surprise load
    try: _build(folder, repo, key, log)
    finally: torch.set_num_threads(threads)
    if log: log(f"GPT-2 stand-in built in {time.time() - t0:.0f} s: {repo}")
    return folder


def _build(folder: Path, repo: Path, key: str, log=None):
    "Write the stand-in's cache entry (see `build_hf_home`)."
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    if repo.exists(): shutil.rmtree(repo)
    snapshot, blobs = repo/'snapshots'/key, repo/'blobs'
    snapshot.mkdir(parents=True); blobs.mkdir()
    text = lambda obj: (lambda p: p.write_text(json.dumps(obj, indent=2) + '\n'))
    for name in ('vocab.json', 'merges.txt'): _put(snapshot, blobs, name, lambda p, n=name: shutil.copyfile(TOKENIZER_FILES/n, p))
    _put(snapshot, blobs, 'tokenizer.json', _tokenizer_json)
    _put(snapshot, blobs, 'tokenizer_config.json', text(TOKENIZER_CONFIG))
    _put(snapshot, blobs, 'config.json', text(CONFIG))
    _put(snapshot, blobs, 'generation_config.json', text(GENERATION_CONFIG))
    tok = AutoTokenizer.from_pretrained(str(snapshot), add_bos_token=True)  # the tokenizer the model will be loaded with
    model = train(tok, log=log)
    rates = pass_rates(model, tok)
    if min(rates.values()) < 0.9:  # the study needs prompts of every start member to pass the filter
        raise RuntimeError(f"The GPT-2 stand-in did not learn the tasks (filter pass rates {rates}): retune TRAIN.")
    # the hub's GPT-2 file holds the base model's weights under their GPT2Model names (wte.weight, h.0.attn.c_attn.weight, ...)
    sd = {k: v.detach().contiguous() for k, v in model.transformer.state_dict().items()}
    _put(snapshot, blobs, 'model.safetensors', lambda p: save_file(sd, str(p), metadata={'format': 'pt'}))
    add_config_only(folder, key)
    (repo/'refs').mkdir()
    (repo/'refs'/'main').write_text(key)  # written last: a half-built folder is never taken for a built one


if __name__ == '__main__':
    sys.path.insert(0, str(HERE.parent))
    out = build_hf_home(sys.argv[1] if len(sys.argv) > 1 else 'gpt2-standin', log=print)
    print(f"HF_HOME={out.resolve()} HF_HUB_OFFLINE=1")
