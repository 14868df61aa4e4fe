"""Four `python -m pipeline extract` processes on overlapping model sets share one store: every entry is
committed once, `store verify` passes, and the shards equal those of a single-process run."""

from __future__ import annotations

import json
import os

import pytest
from sharing_helpers import start_cli, write_config

from store import Store, commands

pytestmark = pytest.mark.slow

MODELS = ("llama", "bert", "t5")


def _shards(store: Store) -> dict[str, list]:
    out = {}
    for info in store.list():
        m = store.open(info.key).manifest
        out[info.key] = [(s["index"], s["row_start"], s["n_rows"], s["sha256"], s["table_sha256"]) for s in m["shards"]]
    return out


def test_four_concurrent_extracts_into_one_store(tmp_path):
    cfg = str(write_config(tmp_path / "tiny.toml", models=MODELS, limit=32, shard_rows=8))
    shared, single = tmp_path / "shared", tmp_path / "single"
    runs = [
        ["--models", "llama,bert"],
        ["--models", "bert,t5"],
        [],  # two identical runs of every model
        [],
    ]
    procs = [start_cli("extract", "--config", cfg, "--store", str(shared), "-q", *extra) for extra in runs]
    procs.append(start_cli("extract", "--config", cfg, "--store", str(single), "-q"))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out

    store = Store(shared)
    text, code = commands.verify(store)
    assert code == 0, text
    rows = json.loads(commands.ls(store, as_json=True))
    names = sorted(r["name"] for r in rows)
    assert names == sorted(f"sst2/{split}/{m}" for m in MODELS for split in ("train", "dev", "test"))  # each once
    assert all(r["complete"] and r["rows"] == 32 for r in rows)
    assert _shards(store) == _shards(Store(single))
    for key in (r["key"] for r in rows):
        files = sorted(os.listdir(shared / "entries" / key))
        assert files == sorted(["manifest.json"] + [f"shard_{i:05d}.{ext}" for i in range(4) for ext in ("h5", "parquet")])
    assert os.listdir(shared / "leases") == [] and os.listdir(shared / "tmp") == []
