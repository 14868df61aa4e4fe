"""Shared fixtures: one description factory and one helper that writes a small sharded entry."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from store import Store, fingerprint

BASE_DESCRIPTION = {
    "kind": "features",
    "format_version": 1,
    "dataset": {"name": "sst2", "split": "train", "fingerprint": "ab" * 32},
    "model": {"name": "bert", "revision": "r1"},
    "max_length": 128,
    "poolings": ["mean", "first", "last"],
    "dtype": "float32",
    "n_layers": 3,
}


def make_description(**overrides) -> dict:
    """BASE_DESCRIPTION with dotted-key overrides, e.g. make_description(**{'model.name': 'roberta'})."""
    desc = copy.deepcopy(BASE_DESCRIPTION)
    for dotted, value in overrides.items():
        node = desc
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return desc


def shard_inputs(index: int, rows_per_shard: int = 5, n_layers: int = 3, width: int = 4, ffn: int = 6):
    """Deterministic arrays, table and attrs for shard `index`."""
    rng = np.random.default_rng(index)
    row_start = index * rows_per_shard
    arrays = {
        "hidden/mean": rng.standard_normal((rows_per_shard, n_layers, width)).astype(np.float32),
        "hidden/first": rng.standard_normal((rows_per_shard, n_layers, width)).astype(np.float32),
        "ffn/fire_count": rng.integers(0, 10, (n_layers, ffn)).astype(np.int64),
    }
    table = pd.DataFrame(
        {
            "id": np.arange(row_start, row_start + rows_per_shard),
            "label": rng.integers(0, 2, rows_per_shard),
            "text_sha256": [f"{i:064x}" for i in range(row_start, row_start + rows_per_shard)],
        }
    )
    attrs = {"ffn/fire_count": {"threshold": 0.0, "n_tokens": 10 * (index + 1)}}
    return arrays, table, row_start, attrs


@pytest.fixture
def description() -> Callable[..., dict]:
    return make_description


@pytest.fixture
def make_shard() -> Callable[..., tuple]:
    return shard_inputs


@pytest.fixture
def write_entry() -> Callable[..., tuple]:
    """write_entry(store, n_shards=3, description=None, commit=True) -> (key, per-shard inputs, entry or writer)."""

    def write(store: Store, n_shards: int = 3, description: dict | None = None, commit: bool = True):
        desc = description or make_description()
        key = fingerprint(desc)
        w = store.writer(key, desc, n_shards=n_shards)
        inputs = [shard_inputs(i) for i in range(n_shards)]
        for i, (arrays, table, row_start, attrs) in enumerate(inputs):
            w.write_shard(i, arrays, table, row_start=row_start, attrs=attrs)
        return key, inputs, (w.commit() if commit else w)

    return write
