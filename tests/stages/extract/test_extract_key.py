"""The store key: everything that changes the stored bytes is in it, nothing else is."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from extract_helpers import LABELS, TEXTS, CountingLoader, make_request, make_split, replace_cfg

from pipeline.models import resolve
from pipeline.models.random_init import random_model
from stages.extract.runner import extract_entry
from store import Store

BASE = make_request("bert")


@pytest.mark.parametrize(
    "overrides",
    [
        {"device": "cuda"},
        {"device": "cuda:1"},
        {"device": "cpu"},
        {"token_budget": 16},
        {"token_budget": 100_000},
        {"max_batch_size": 1},
        {"max_batch_size": 999},
        {"allow_nonfinite": True},
        {"poolings": ("last", "first", "mean")},
        {"ffn_poolings": ("max", "mean")},  # order is irrelevant
    ],
    ids=str,
)
def test_key_ignores_what_does_not_change_bytes(overrides):
    assert replace_cfg(BASE, **overrides).key == BASE.key


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_length": 23},
        {"max_length": 128},
        {"poolings": ("mean",)},
        {"poolings": ("mean", "first")},
        {"ffn_poolings": ("mean",)},
        {"storage_dtype": "float32"},
        {"special_tokens_in_mean": True},
        {"compute_dtype": "bfloat16"},
        {"shard_rows": 6},
    ],
    ids=str,
)
def test_key_changes_with_what_changes_bytes(overrides):
    assert replace_cfg(BASE, **overrides).key != BASE.key


def test_key_changes_with_thresholds_sink_and_model_identity():
    assert make_request("bert", thresholds=(0.1,)).key != BASE.key
    assert make_request("bert", thresholds=(0.0, 0.1)).key != BASE.key
    assert replace_cfg(make_request("bert", thresholds=()), thresholds=(0.0, 0.3)).key != make_request("bert", thresholds=()).key
    llama = make_request("llama")
    assert make_request("llama", sink="none").key != llama.key
    assert llama.key_material()["first"] == "after_sink" and "first" not in make_request("llama", sink="none").key_material()
    assert make_request("llama", sink="<unk>").key != llama.key
    # 'auto' means nothing for an encoder: the same key as 'none'
    assert make_request("bert", sink="none").key == BASE.key
    keys = {make_request(f).key for f in ("bert", "roberta", "t5", "llama")}
    assert len(keys) == 4
    spec = resolve("tiny-random-bert")
    other_seed = dataclasses.replace(spec, identity={**spec.identity, "seed": 1})
    assert make_request("bert", spec=other_seed).key != BASE.key
    # the model's display name is a label, not content
    assert make_request("bert", name="my-bert").key == BASE.key


@pytest.mark.parametrize("change", ["one text", "one label", "row order", "one row fewer"])
def test_key_changes_with_the_data(change):
    texts, labels = list(TEXTS), LABELS.copy()
    if change == "one text":
        texts[5] = texts[5].replace("france", "spain")
    elif change == "one label":
        labels[0] = 0
    elif change == "row order":
        texts[0], texts[1] = texts[1], texts[0]
        labels[0], labels[1] = labels[1], labels[0]
    else:
        texts, labels = texts[:-1], labels[:-1]
    assert make_request("bert", split=make_split(texts, labels)).key != BASE.key


def test_key_ignores_dataset_and_split_names():
    assert make_request("bert", split=make_split(name="dev", dataset="other")).key == BASE.key


def test_key_material_is_json_and_stable():
    material = BASE.key_material()
    assert json.loads(json.dumps(material)) == material
    assert make_request("bert").key == BASE.key and len(BASE.key) == 64
    assert material["hooks"]["ffn"] == "encoder.layer.*.output.dense:input"


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    """The tiny BERT saved to folders: the same weights, other seed weights, and an edited tokenizer."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("seed0", 0), ("seed1", 1)):
        model, tok = random_model("bert", seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    shutil.copytree(root / "seed0", root / "tok")
    cfg_file = root / "tok" / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    tok_cfg["model_max_length"] = 64
    cfg_file.write_text(json.dumps(tok_cfg))
    out["tok"] = root / "tok"
    return out


def test_local_folder_key_follows_weights_and_tokenizer(local_models):
    specs = {name: resolve(str(path)) for name, path in local_models.items()}
    assert all(s.kind == "local" for s in specs.values())
    keys = {name: make_request("bert", spec=spec).key for name, spec in specs.items()}
    assert len(set(keys.values())) == 3
    assert resolve(str(local_models["seed0"])).identity == specs["seed0"].identity  # stable


def test_local_folder_extracts_same_values_as_tiny_model(tmp_path, local_models):
    """Loading the saved folder through the real loader gives the same features as the in-process tiny model."""
    from stages.extract.runner import load_for_extract

    local = make_request("bert", spec=resolve(str(local_models["seed0"])), storage_dtype="float32")
    tiny = make_request("bert", storage_dtype="float32")
    assert local.key != tiny.key
    store = Store(tmp_path)
    extract_entry(local, store, load_for_extract(local.model, local.spec, local.extract), progress=False)
    extract_entry(tiny, store, CountingLoader("bert"), progress=False)
    a, b = store.open(local.key), store.open(tiny.key)
    for name in ("hidden/mean", "hidden/last", "ffn/max"):
        np.testing.assert_allclose(a.array(name).compute(), b.array(name).compute(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a.per_shard("ffn/fire_count").compute(), b.per_shard("ffn/fire_count").compute())


@pytest.mark.parametrize(
    "family, rule, thresholds",
    [
        ("llama", "abs_gt", (0.1, 0.5)),
        ("bert", "gt", (0.0, 0.1)),
        ("roberta", "gt", (0.0, 0.1)),
        ("t5", "gt", (0.0,)),
    ],
)
def test_firing_rule_and_default_thresholds_per_family(family, rule, thresholds):
    """Gated FFNs (Llama) fire on magnitude; empty threshold lists fall back to the family default."""
    req = make_request(family, thresholds=())
    assert req.fire_rule == rule and req.thresholds == thresholds
    assert req.key_material()["firing"] == {"rule": rule, "thresholds": list(thresholds)}
    # extract.thresholds applies to every model; a model's own list wins over it
    assert replace_cfg(req, thresholds=(0.2,)).thresholds == (0.2,)
    assert replace_cfg(make_request(family, thresholds=(0.3,)), thresholds=(0.2,)).thresholds == (0.3,)


def test_gated_t5_uses_the_magnitude_rule(tmp_path):
    from pipeline.models.families import FAMILIES, ffn_kind

    t5 = next(f for f in FAMILIES if f.name == "t5")
    assert ffn_kind(t5, {"feed_forward_proj": "gated-gelu"}) == "gated"
    assert ffn_kind(t5, {"feed_forward_proj": "relu"}) == "relu"
    bert = next(f for f in FAMILIES if f.name == "bert")
    assert ffn_kind(bert, {"hidden_act": "relu"}) == "relu" and ffn_kind(bert, {"hidden_act": "gelu"}) == "gelu"
