"""Config loading and validation: every mistake is a ConfigError naming the field, the value and what is allowed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from config_factory import DELETE, tiny_models, write_config
from pipeline_helpers import PROJECT_ROOT

from pipeline.config import (
    COMPUTE_DTYPES,
    ExperimentConfig,
    ExtractConfig,
    ModelConfig,
    field_help,
    from_dict,
    load_config,
    to_dict,
)
from pipeline.errors import ConfigError, PipelineError

# --- the shipped configs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default.toml", "tiny.toml"])
def test_shipped_configs_load(name):
    cfg = load_config(PROJECT_ROOT / "configs" / name)
    assert isinstance(cfg, ExperimentConfig)
    assert [m.name for m in cfg.models] == (
        ["llama", "bert", "mpnet", "roberta", "t5"] if name == "default.toml" else ["llama", "bert", "roberta", "t5"]
    )
    assert cfg.data.splits[0] == "train"
    assert cfg.source.endswith(name)
    # every fusion block names a configured model
    assert {b.split(":")[0] for b in cfg.train.fusion.inputs} <= {m.name for m in cfg.models}


def test_trec_config_carves_dev_and_fuses_the_real_models():
    """TREC has no dev file: the config carves 10% of train as dev; all three models are real, so all are fused."""
    from pipeline.models import EMBEDDED

    cfg = load_config(PROJECT_ROOT / "configs" / "trec.toml")
    assert cfg.data.splits == ("train", "test") and cfg.data.dev_fraction == 0.1
    assert cfg.split_names == ("train", "test", "dev")
    assert [m.name for m in cfg.models] == ["llama", "bert", "mpnet"]
    assert all(m.source in EMBEDDED and not EMBEDDED[m.source].random_init for m in cfg.models)
    assert Path(cfg.data.path) == PROJECT_ROOT / "data" / "trec"


def test_agnews_config_loads_a_topical_set_with_real_models():
    """AG News: 4 topics in a stratified 4,000/1,000/1,900 subset, where STEM keywords are common (mostly Sci/Tech)."""
    import numpy as np

    from pipeline.data import load_splits
    from pipeline.models import EMBEDDED
    from stages.score.sparsity import keyword_mask

    cfg = load_config(PROJECT_ROOT / "configs" / "agnews.toml")
    assert [m.name for m in cfg.models] == ["llama", "bert"] and all(m.source in EMBEDDED for m in cfg.models)
    assert {b.split(":")[0] for b in cfg.train.fusion.inputs} <= {"llama", "bert"}
    splits = load_splits(dataclasses.replace(cfg.data, path=str(PROJECT_ROOT / cfg.data.path)))
    assert {s: len(v) for s, v in splits.items()} == {"train": 4000, "dev": 1000, "test": 1900}
    for split in splits.values():
        counts = np.bincount(split.labels)
        assert len(counts) == 4 and counts.max() - counts.min() <= 1  # stratified
    train = splits["train"]
    words = [w.strip() for w in (PROJECT_ROOT / cfg.score.keywords).read_text().splitlines() if w.strip()]
    kw = keyword_mask(list(train.texts), words)
    rate = [kw[train.labels == c].mean() for c in range(4)]
    assert kw.mean() > 0.05 and int(np.argmax(rate)) == 3  # Sci/Tech carries the keywords


def test_default_config_uses_embedded_models_and_tiny_uses_tiny_models():
    from pipeline.models import EMBEDDED

    default = load_config(PROJECT_ROOT / "configs" / "default.toml")
    tiny = load_config(PROJECT_ROOT / "configs" / "tiny.toml")
    assert all(m.source in EMBEDDED for m in default.models)
    assert all(m.source.startswith("tiny-random-") for m in tiny.models)
    assert tiny.data.limit > 0


def test_factory_config_loads_with_defaults(make_config):
    cfg = load_config(make_config())
    assert cfg.extract.max_length == 32
    assert cfg.extract.storage_dtype == "float16"
    assert cfg.model("bert").source == "tiny-random-bert"
    assert cfg.seed == 0
    assert to_dict(cfg)["data"]["splits"] == ["train", "dev", "test"]


def test_config_is_frozen(make_config):
    cfg = load_config(make_config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_int_is_accepted_for_float_fields(make_config):
    cfg = load_config(make_config(**{"train.Cs": [1, 2.5], "models.0.thresholds": [0, 1]}))
    assert cfg.train.Cs == (1.0, 2.5)
    assert all(type(c) is float for c in cfg.train.Cs)
    assert all(type(t) is float for t in cfg.model("bert").thresholds)


def test_load_config_overrides(make_config):
    cfg = load_config(make_config(), overrides={"extract.max_length": 7, "score.split": "dev"})
    assert cfg.extract.max_length == 7
    assert cfg.score.split == "dev"


def test_model_lookup_unknown_name(make_config):
    cfg = load_config(make_config())
    with pytest.raises(ConfigError, match=r"no model named 'gpt'.*bert, llama"):
        cfg.model("gpt")


def test_field_help_covers_every_field():
    rows = field_help(ExtractConfig)
    assert {name for name, _, _ in rows} == {f.name for f in dataclasses.fields(ExtractConfig)}
    assert all(help_text for _, help_text, _ in rows)
    assert "source" not in {name for name, _, _ in field_help(ExperimentConfig)}  # internal field hidden


# --- unknown keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "where", "some_allowed"),
    [
        ("sed", "sed", ["seed", "models", "extract"]),
        ("extract.max_lenght", "extract.max_lenght", ["max_length", "storage_dtype", "device"]),
        ("models.0.sourse", "models[0].sourse", ["source", "revision", "thresholds", "sink"]),
        ("train.fusion.widht", "train.fusion.widht", ["width", "sigma"]),
    ],
)
def test_typo_key_is_named_with_allowed_keys(make_config, key, where, some_allowed):
    path = make_config(**{key: 1})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"unknown key {where}" in msg
    assert str(path) in msg
    allowed = msg.split("allowed in", 1)[1]
    for k in some_allowed:
        assert k in allowed
    assert "\n" not in msg


def test_config_error_is_caught_as_a_pipeline_error(make_config):
    """The CLI turns every PipelineError into one `error:` line; a bad config must be one of them."""
    with pytest.raises(PipelineError, match=r"extract\.max_length"):
        load_config(make_config(**{"extract.max_length": -1}))


# --- types, ranges, choices ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("extract.max_length", "128", ["extract.max_length", "expected int", "'128'"]),
        ("extract.max_length", 12.5, ["extract.max_length", "expected int", "12.5"]),
        ("extract.special_tokens_in_mean", 1, ["extract.special_tokens_in_mean", "expected bool", "1"]),
        ("seed", True, ["seed", "expected int", "True"]),
        ("models.0.source", 5, ["models[0].source", "expected str", "5"]),
        ("data.splits", "train", ["data.splits", "expected a list", "'train'"]),
        ("extract", 3, ["extract", "expected a table"]),
        ("data.files", ["a.tsv"], ["data.files", "expected a table"]),
        ("data.files", {"train": 3}, ["data.files.train", "expected str", "3"]),
        ("train.Cs", [0.1, "x"], ["train.Cs[1]", "expected float", "'x'"]),
    ],
)
def test_wrong_type_names_field_and_value(make_config, key, value, expected):
    with pytest.raises(ConfigError) as e:
        load_config(make_config(**{key: value}))
    for part in expected:
        assert part in str(e.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("extract.max_length", 1, ["extract.max_length", "1", "minimum 2"]),
        ("extract.max_length", 2_000_000, ["extract.max_length", "2000000", "maximum 1000000"]),
        ("extract.token_budget", 0, ["extract.token_budget", "0", "minimum 16"]),
        ("data.limit", -1, ["data.limit", "-1", "minimum 0"]),
        ("seed", -3, ["seed", "-3", "minimum 0"]),
        ("train.fusion.dropout", 0.99, ["train.fusion.dropout", "0.99", "[0.0, 0.95]"]),
        ("train.fusion.lr", -0.1, ["train.fusion.lr", "-0.1", "(0.0, inf)"]),
        ("train.Cs", [1.0, -1.0], ["train.Cs", "-1.0", "finite reals > 0.0"]),
        ("train.fusion.sigma", float("inf"), ["train.fusion.sigma", "inf", "finite"]),
        ("models.0.thresholds", [0.1, float("nan")], ["models[0].thresholds", "nan", "finite"]),
        ("extract.thresholds", [0.1, 0.1], ["extract.thresholds", "duplicates"]),
        ("extract.thresholds", [0.1 * i for i in range(9)], ["extract.thresholds", "9 values", "at most 8"]),
        ("models.0.sink", " ", ["models[0].sink", "must not be empty"]),
        ("train.fusion.dropout", float("nan"), ["train.fusion.dropout", "nan"]),
        ("score.min_fires", 0, ["score.min_fires", "0", "minimum 1"]),
    ],
)
def test_out_of_range_names_field_value_and_bound(make_config, key, value, expected):
    with pytest.raises(ConfigError) as e:
        load_config(make_config(**{key: value}))
    for part in expected:
        assert part in str(e.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("extract.storage_dtype", "float64", ["extract.storage_dtype", "'float64'", "float16", "float32"]),
        ("extract.compute_dtype", "fp16", ["extract.compute_dtype", "'fp16'", *COMPUTE_DTYPES]),
        ("extract.poolings", ["mean", "cls"], ["extract.poolings", "'cls'", "mean", "first", "last"]),
        ("extract.ffn_poolings", ["median"], ["extract.ffn_poolings", "'median'", "max"]),
        ("train.poolings", ["sum"], ["train.poolings", "'sum'", "mean"]),
        ("extract.device", "gpu", ["extract.device", "'gpu'", "cuda:N"]),
        ("extract.device", "cuda:x", ["extract.device", "'cuda:x'"]),
        ("score.scheduler", "ray", ["score.scheduler", "'ray'", "tcp://"]),
        ("models.0.name", "bad name", ["models[0].name", "'bad name'", "letters, digits"]),
        ("name", "-x", ["name", "'-x'"]),
        ("data.name", "", ["data.name", "''"]),
    ],
)
def test_bad_choice_names_field_value_and_choices(make_config, key, value, expected):
    with pytest.raises(ConfigError) as e:
        load_config(make_config(**{key: value}))
    for part in expected:
        assert part in str(e.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:11", "mps"])
def test_valid_devices_accepted(make_config, device):
    assert load_config(make_config(**{"extract.device": device})).extract.device == device


@pytest.mark.parametrize("scheduler", ["threads", "synchronous", "processes", "tcp://10.0.0.1:8786"])
def test_valid_schedulers_accepted(make_config, scheduler):
    assert load_config(make_config(**{"score.scheduler": scheduler})).score.scheduler == scheduler


@pytest.mark.parametrize(
    ("key", "field"),
    [("extract.poolings", "extract.poolings"), ("data.splits", "data.splits"), ("train.Cs", "train.Cs"), ("models", "models")],
)
def test_empty_lists_rejected(make_config, key, field):
    with pytest.raises(ConfigError, match=rf"{field}.*(must not be empty|missing)"):
        load_config(make_config(**{key: []}))


# --- file-level problems ------------------------------------------------------------------------


def test_malformed_toml(make_config):
    path = make_config(raw="\n[extract\nmax_length = 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    assert "malformed TOML" in str(e.value)


def test_duplicate_key_in_toml_is_malformed(make_config):
    with pytest.raises(ConfigError, match="malformed TOML"):
        load_config(make_config(raw='\n[data]\nname = "again"\n'))  # [data] defined twice


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_non_utf8_config(tmp_path):
    p = tmp_path / "c.toml"
    p.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(p)


@pytest.mark.parametrize("key", ["name", "data", "models", "data.name", "models.0.source", "models.1.name"])
def test_missing_required_key(make_config, key):
    with pytest.raises(ConfigError) as e:
        load_config(make_config(**{key: DELETE}))
    leaf = key.replace(".0.", "[0].").replace(".1.", "[1].")
    assert f"missing required key {leaf}" in str(e.value)


def test_duplicate_model_names(make_config):
    with pytest.raises(ConfigError, match=r"duplicate model name.*'bert'"):
        load_config(make_config(**{"models.1.name": "bert"}))


@pytest.mark.parametrize(
    ("key", "value"),
    [("score.split", "validation"), ("train.dev_split", "valid"), ("train.test_split", "holdout")],
)
def test_split_not_in_data_splits(make_config, key, value):
    with pytest.raises(ConfigError) as e:
        load_config(make_config(**{key: value}))
    assert repr(value) in str(e.value)
    assert "data.splits" in str(e.value)


def test_dropping_a_split_used_by_train_is_an_error(make_config):
    with pytest.raises(ConfigError, match="'test'"):
        load_config(make_config(**{"data.splits": ["train", "dev"]}))
    cfg = load_config(make_config(**{"data.splits": ["train", "dev"], "train.test_split": "dev"}))
    assert cfg.data.splits == ("train", "dev")


def test_fusion_average_not_in_inputs(make_config):
    with pytest.raises(ConfigError) as e:
        load_config(make_config(**{"train.fusion.average": ["llama:-2:mean"]}))
    assert "train.fusion.average" in str(e.value)
    assert "llama:-2:mean" in str(e.value)


def test_from_dict_without_a_file_reports_keys():
    with pytest.raises(ConfigError, match=r"unknown key models\.sorce; allowed in \[models\]: name, revision, sink, source, thresholds"):
        from_dict(ModelConfig, {"name": "a", "sorce": "x"}, "models")
    m = from_dict(ModelConfig, {"name": "a", "source": "x"})
    assert m.thresholds == () and m.sink == "auto" and m.trust_remote_code is False


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch, data_dir):
    """A config with relative paths runs from any directory; shipped configs too."""
    import shutil

    from pipeline.config import load_config
    from pipeline.data import load_splits

    exp = tmp_path / "exp"
    shutil.copytree(data_dir, exp / "data")
    (exp / "kw.txt").write_text("good\n", encoding="utf-8")
    relative = {"name": "rel", "data": {"name": "toy", "path": "data"}, "models": tiny_models("bert"), "score": {"keywords": "kw.txt"}}
    write_config(exp / "c.toml", relative)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config("../exp/c.toml")
    assert cfg.data.path == str((exp / "data").resolve()) and cfg.score.keywords == str((exp / "kw.txt").resolve())
    assert len(load_splits(cfg.data)["train"]) > 0
    shipped = load_config(PROJECT_ROOT / "configs" / "tiny.toml")
    assert Path(shipped.data.path) == (PROJECT_ROOT / "data" / "sst2").resolve()
    assert Path(shipped.score.keywords).is_file()


@pytest.mark.parametrize(
    ("block", "words"),
    [
        ("gamma:-1:mean", ["train.fusion.inputs", "'gamma'", "not in [[models]]", "configured"]),
        ("bert:7:mean", ["train.fusion.inputs", "layer 7", "out of range 0..2"]),
        ("bert:-4:mean", ["layer -4", "out of range"]),
        ("bert:-1:median", ["unknown pooling 'median'", "mean", "pooler"]),
        ("bert-1-mean", ["not model:layer:pooling"]),
        ("bert:1:pooler", ["not model:layer:pooling", "model:pooler"]),
    ],
)
def test_named_fusion_blocks_are_checked_at_load(make_config, block, words):
    """Depth comes from the model config (tiny models: 2 layers) without loading weights."""
    with pytest.raises(ConfigError) as e:
        load_config(make_config(**{"train.fusion.inputs": [block], "train.fusion.average": []}))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_edge_layers_and_pooler_blocks_load(make_config):
    cfg = load_config(make_config(**{"train.fusion.inputs": ["bert:2:mean", "bert:-3:first", "bert:pooler"], "train.fusion.average": []}))
    assert cfg.train.fusion.inputs == ("bert:2:mean", "bert:-3:first", "bert:pooler")


def test_no_fusion_section_means_derived_inputs(make_config):
    cfg = load_config(make_config(**{"train": DELETE}))
    assert cfg.train.fusion.inputs == () and cfg.train.fusion.average == ()
    with pytest.raises(ConfigError, match="train.fusion.average: set only together with train.fusion.inputs"):
        load_config(make_config(**{"train.fusion.inputs": DELETE}))


def test_embedded_depth_is_read_from_the_prepared_config(make_config, tmp_path, monkeypatch):
    folder = tmp_path / "models" / "all-minilm-l6-v2"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": 6}')
    monkeypatch.setenv("LAYERSTORE_MODELS", str(tmp_path / "models"))
    over = {"models.0.source": "all-minilm-l6-v2", "train.fusion.average": []}
    assert load_config(make_config(**over, **{"train.fusion.inputs": ["bert:6:mean"]})).train.fusion.inputs == ("bert:6:mean",)
    with pytest.raises(ConfigError, match=r"layer 7 .*out of range 0\.\.6"):
        load_config(make_config(**over, **{"train.fusion.inputs": ["bert:7:mean"]}))


def test_dev_fraction_carves_dev_and_must_not_clash(make_config):
    cfg = load_config(make_config(**{"data.splits": ["train", "test"], "data.dev_fraction": 0.25}))
    assert cfg.split_names == ("train", "test", "dev")
    with pytest.raises(ConfigError, match=r"data.dev_fraction.*already has one"):
        load_config(make_config(**{"data.dev_fraction": 0.25}))
    with pytest.raises(ConfigError, match=r"data.dev_fraction: 0.9 is above the maximum 0.5"):
        load_config(make_config(**{"data.splits": ["train", "test"], "data.dev_fraction": 0.9}))
