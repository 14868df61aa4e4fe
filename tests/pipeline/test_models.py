"""Offline model resolution, identities, the family table, tiny random models and (slow) the embedded models."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from pipeline.errors import ModelError
from pipeline.models import EMBEDDED, FAMILIES, ModelSpec, family_of, load, resolve
from pipeline.models.families import ffn_size, n_layers
from pipeline.models.random_init import SMALL, TINY, random_model
from pipeline.models.registry import IDENTITY_FILE, models_dir

CPU = torch.device("cpu")
FAMILY_NAMES = ["llama", "bert", "roberta", "mpnet", "t5"]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test loudly (not as an OSError that code might swallow)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def save_tiny(folder, family="bert"):
    model, tok = random_model(family)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# --- resolve -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_resolve_embedded(name, no_network):
    spec = resolve(name)
    assert isinstance(spec, ModelSpec)
    assert spec.kind == "embedded"
    assert spec.source == name
    assert spec.identity["kind"] == "files"
    assert len(spec.identity["sha256"]) == 64
    assert spec.random_init == EMBEDDED[name].random_init
    assert (models_dir() / name / "config.json").is_file()
    recorded = json.loads((models_dir() / name / IDENTITY_FILE).read_text())
    assert recorded["family"] == EMBEDDED[name].family
    assert recorded["sha256"] == spec.identity["sha256"]
    assert ("random weights" in spec.display) == spec.random_init
    assert resolve(name) == spec  # stable


def test_embedded_identities_differ():
    assert len({resolve(n).identity["sha256"] for n in EMBEDDED}) == len(EMBEDDED)


def test_embedded_not_prepared(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSTORE_MODELS", str(tmp_path))
    with pytest.raises(ModelError, match=r"'all-minilm-l6-v2' is not prepared.*make setup"):
        resolve("all-minilm-l6-v2")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_resolve_tiny(family):
    spec = resolve(f"tiny-random-{family}")
    assert spec.kind == "tiny" and spec.random_init
    assert spec.identity["family"] == family
    assert spec.identity["size"] == TINY.__dict__
    assert "random weights" in spec.display
    json.dumps(spec.identity)  # JSON-able: it goes into store keys


def test_tiny_identities_differ_by_family():
    idents = [json.dumps(resolve(f"tiny-random-{f}").identity, sort_keys=True) for f in FAMILY_NAMES]
    assert len(set(idents)) == len(idents)


def test_unknown_tiny_family():
    with pytest.raises(ModelError, match=r"unknown tiny model 'tiny-random-gpt2'.*tiny-random-bert"):
        resolve("tiny-random-gpt2")


def test_unknown_hub_id_fails_fast_offline(no_network):
    import time

    t0 = time.perf_counter()
    with pytest.raises(ModelError) as e:
        resolve("no-such-org/no-such-model")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "'no-such-org/no-such-model'" in msg
    assert "huggingface-cli download no-such-org/no-such-model" in msg  # how to make it available
    assert "local folder" in msg
    for name in EMBEDDED:
        assert name in msg
    assert "\n" not in msg


def test_unknown_hub_revision_fails(no_network, tmp_path, monkeypatch):
    """A cached repo but a revision that is not cached is the same clear error."""
    cache = fake_hub_cache(tmp_path, monkeypatch, "org/cached-model")
    assert cache.is_dir()
    with pytest.raises(ModelError, match="org/cached-model"):
        resolve("org/cached-model", revision="f" * 40)


def fake_hub_cache(tmp_path, monkeypatch, repo_id: str, commit: str = "a" * 40):
    """A minimal Hugging Face cache holding ``repo_id`` at ``commit`` (main)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_in_local_cache_resolves(no_network, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    fake_hub_cache(tmp_path, monkeypatch, "org/cached-model", commit)
    spec = resolve("org/cached-model")
    assert spec.kind == "hub"
    assert spec.identity == {"kind": "hub", "repo": "org/cached-model", "commit": commit}
    assert spec.path.endswith(commit)
    assert resolve("org/cached-model", revision=commit).identity["commit"] == commit


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve(str(tmp_path / "no-model-here"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve("./relative/missing")


def test_local_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match=r"no config.json") as e:
        resolve(str(tmp_path / "m"))
    assert str(tmp_path / "m") in str(e.value)


def test_local_folder_identity_follows_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_tiny(tmp_path / "bert-local")
    spec = resolve(str(folder))
    assert spec.kind == "local" and not spec.random_init
    assert spec.path == str(folder.resolve())
    assert spec.identity["kind"] == "files"
    assert resolve(str(folder)).identity == spec.identity  # stable when nothing changes

    # a second copy of the same files has the same identity (content, not location)
    copy = shutil.copytree(folder, tmp_path / "copy")
    assert resolve(str(copy)).identity == spec.identity

    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    changed = resolve(str(folder)).identity
    assert changed != spec.identity

    # the tokenizer is part of the identity too; identity.json and dotfiles are not
    (folder / ".DS_Store").write_text("x")
    (folder / IDENTITY_FILE).write_text("{}")
    assert resolve(str(folder)).identity == changed
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 77
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert resolve(str(folder)).identity != changed


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_local_folder_loads_same_model(tmp_path, family):
    folder = save_tiny(tmp_path / family, family)
    model, tok, fam = load(resolve(str(folder)), device=CPU, dtype=torch.float32)
    ref, ref_tok = random_model(family)
    assert fam.name == family
    assert tok("a good film")["input_ids"] == ref_tok("a good film")["input_ids"]
    ref_state = ref.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_local_folder_with_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(folder)
    spec = resolve(str(folder))  # resolution only needs a config.json
    with pytest.raises(ModelError, match=r"model_type='gpt2'.*llama, bert, roberta, mpnet, t5"):
        load(spec, device=CPU, dtype=torch.float32)


# --- families ----------------------------------------------------------------------------------


def _config(model_type: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig, MPNetConfig, RobertaConfig, T5Config

    return {"llama": LlamaConfig, "bert": BertConfig, "roberta": RobertaConfig, "mpnet": MPNetConfig, "t5": T5Config, "gpt2": GPT2Config}[
        model_type
    ]()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_of_recognises_configs(family):
    assert family_of(_config(family)).name == family


def test_family_of_rejects_gpt2_listing_supported():
    with pytest.raises(ModelError) as e:
        family_of(_config("gpt2"))
    msg = str(e.value)
    assert "'gpt2'" in msg
    for fam in FAMILY_NAMES:
        assert fam in msg


def test_family_of_uses_model_type_not_name():
    from transformers import BertConfig

    cfg = BertConfig()
    cfg._name_or_path = "my-llama-lookalike"
    assert family_of(cfg).name == "bert"
    assert {f.name for f in FAMILIES} == set(FAMILY_NAMES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_model_family_table(family):
    model, tok, fam = load(resolve(f"tiny-random-{family}"), device=CPU, dtype=torch.float32)
    assert fam.name == family
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None
    blocks = fam.block_list(model)
    assert len(blocks) == n_layers(model.config) == TINY.layers
    for block in blocks:
        proj = fam.ffn_projection(block)
        assert isinstance(proj, torch.nn.Linear)
        assert proj.in_features == ffn_size(model.config) == TINY.ffn


def _forward(model, tok, texts):
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
    return enc, out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_model_forward(family):
    model, tok, _ = load(resolve(f"tiny-random-{family}"), device=CPU, dtype=torch.float32)
    enc, out = _forward(model, tok, ["a good film", "a rather long and dull film about nothing"])
    assert len(out.hidden_states) == n_layers(model.config) + 1
    for h in out.hidden_states:
        assert h.shape == (2, enc["input_ids"].shape[1], TINY.hidden)
        assert torch.isfinite(h).all()


# --- tiny random models are deterministic --------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tiny_random_is_deterministic(family):
    m1, t1 = random_model(family)
    torch.manual_seed(12345)  # global RNG state must not matter
    torch.rand(7)
    m2, t2 = random_model(family)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert t1.get_vocab() == t2.get_vocab()
    assert len(t1) == TINY.vocab
    text = "a stirring , funny and finally transporting film"
    assert t1(text)["input_ids"] == t2(text)["input_ids"]
    assert t1.pad_token_id == t2.pad_token_id


def test_tiny_random_seed_changes_weights():
    a, _ = random_model("bert", seed=0)
    b, _ = random_model("bert", seed=1)
    name = "embeddings.word_embeddings.weight"
    assert not torch.equal(a.state_dict()[name], b.state_dict()[name])


def test_tokenizer_conventions():
    _, bert_tok = random_model("bert")
    ids = bert_tok("Hello World")["input_ids"]
    assert ids[0] == bert_tok.cls_token_id and ids[-1] == bert_tok.sep_token_id
    assert (
        bert_tok.convert_ids_to_tokens(ids)[1:-1] == bert_tok.convert_ids_to_tokens(bert_tok("hello world")["input_ids"])[1:-1]
    )  # lowercased
    _, t5_tok = random_model("t5")
    ids = t5_tok("a film")["input_ids"]
    assert ids[-1] == t5_tok.eos_token_id and t5_tok.pad_token_id == 0
    _, llama_tok = random_model("llama")
    assert llama_tok("a film")["input_ids"][0] == llama_tok.bos_token_id
    _, roberta_tok = random_model("roberta")
    ids = roberta_tok("a film")["input_ids"]
    assert ids[0] == roberta_tok.bos_token_id and ids[-1] == roberta_tok.eos_token_id


def test_embedded_random_models_match_their_recipe():
    """roberta-random-small / t5-random-small are the SMALL recipe at seed 0."""
    from transformers import AutoConfig

    for name, fam in (("roberta-random-small", "roberta"), ("t5-random-small", "t5")):
        cfg = AutoConfig.from_pretrained(models_dir() / name)
        assert family_of(cfg).name == fam
        assert n_layers(cfg) == SMALL.layers
        assert ffn_size(cfg) == SMALL.ffn


# --- the real embedded models (slow) -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_model_loads_and_runs(name):
    spec = resolve(name)
    model, tok, fam = load(spec, device=CPU, dtype=torch.float32)
    assert fam.name == EMBEDDED[name].family
    assert tok.pad_token is not None
    assert len(fam.block_list(model)) == n_layers(model.config)
    assert fam.ffn_projection(fam.block_list(model)[0]).in_features == ffn_size(model.config)
    enc, out = _forward(model, tok, ["a stirring , funny and finally transporting film .", "dull ."])
    assert len(out.hidden_states) == n_layers(model.config) + 1
    for h in out.hidden_states:
        assert h.shape[:2] == enc["input_ids"].shape
        assert h.dtype == torch.float32
        assert torch.isfinite(h).all()
    # padding does not leak into real tokens: the short text alone gives the same last layer
    enc1, out1 = _forward(model, tok, ["dull ."])
    n = int(enc1["attention_mask"].sum())
    padded = out.hidden_states[-1][1][enc["attention_mask"][1].bool()]
    assert padded.shape[0] == n
    assert torch.allclose(padded, out1.hidden_states[-1][0][:n], atol=1e-4)
