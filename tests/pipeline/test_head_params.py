"""One constraint source: the config and the heads share defaults and constraints (pipeline/head_params.py)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from pipeline.config import FusionConfig, LLMEmbedConfig, TrainConfig, load_config
from pipeline.errors import ConfigError
from pipeline.head_params import FUSION_CONSTRAINTS, LLMEMBED_CONSTRAINTS
from stages.train.concat import ConcatHead
from stages.train.fusion import FusionHead
from stages.train.llmembed import LLMEmbedHead
from stages.train.probes import fit_probe, fit_probes, probe_layers


@pytest.mark.parametrize(
    ("head", "config", "table"),
    [(FusionHead, FusionConfig, FUSION_CONSTRAINTS), (LLMEmbedHead, LLMEmbedConfig, LLMEMBED_CONSTRAINTS)],
    ids=["fusion", "llmembed"],
)
def test_head_defaults_equal_config_defaults(head, config, table):
    params, cfg = head().get_params(), config()
    assert table and {name: params[name] for name in table} == {name: getattr(cfg, name) for name in table}


def test_probe_defaults_equal_config_defaults():
    Cs = TrainConfig().Cs
    assert ConcatHead().get_params()["Cs"] == Cs
    for fn in (fit_probe, fit_probes, probe_layers):
        assert inspect.signature(fn).parameters["Cs"].default == Cs


@pytest.mark.parametrize(
    ("head", "config", "table"),
    [(FusionHead, FusionConfig, FUSION_CONSTRAINTS), (LLMEmbedHead, LLMEmbedConfig, LLMEMBED_CONSTRAINTS)],
    ids=["fusion", "llmembed"],
)
def test_config_checks_each_field_with_the_heads_own_constraint(head, config, table):
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name, constraint in table.items():
        assert fields[name].metadata["constraint"] is constraint
        assert head._parameter_constraints[name] is constraint
    assert {f.name: f for f in dataclasses.fields(TrainConfig)}["Cs"].metadata["constraint"] is ConcatHead._parameter_constraints["Cs"]


BAD = [
    ("train.Cs", [0.0, 1.0], "a non-empty sequence of finite reals > 0.0"),
    ("train.Cs", [1.0, float("inf")], "a non-empty sequence of finite reals > 0.0"),
    ("train.fusion.sigma", 0.0, "a finite real in (0.0, inf)"),
    ("train.fusion.lr", 0.0, "a finite real in (0.0, inf)"),
    ("train.fusion.dropout", 1.0, "a finite real in [0.0, 0.95]"),
    ("train.fusion.width", 0, "an int >= 1"),
    ("train.fusion.hidden", 0, "an int >= 1"),
    ("train.fusion.epochs", 0, "an int >= 1"),
    ("train.fusion.patience", 0, "an int >= 1"),
    ("train.fusion.batch_size", 0, "an int >= 1"),
    ("train.llmembed.sigma", 0.0, "a finite real in (0.0, inf)"),
    ("train.llmembed.lr", 0.0, "a finite real in (0.0, inf)"),
    ("train.llmembed.width", -1, "an int >= 0"),
    ("train.llmembed.hidden", [256, 0], "a non-empty sequence of ints >= 1"),
    ("train.llmembed.hidden", [], "a non-empty sequence of ints >= 1"),
    ("train.llmembed.dropout", 0.99, "a finite real in [0.0, 0.95]"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_head_value_fails_at_config_load(make_config, key, value, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(make_config(**{key: value}))
    assert f"{key}: {value!r} is invalid; expected {allowed}" in str(e.value)
