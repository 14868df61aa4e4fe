"""Helpers shared by the stage-runner and end-to-end tests: a tiny config, a real extracted store.

The extracted store (2 tiny random models x 3 splits x 80 rows, shard_rows 32) is built once
per test session and reused read-only; tests that write (score, train) copy it first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import config_factory
import torch
from config_factory import SST2 as DATA
from config_factory import apply_overrides, sst2_experiment


def tiny_experiment(*, rows: int = 80, data: Path = DATA) -> dict:
    """Two tiny random models (llama, t5) over the first ``rows`` rows of each split of ``data``."""
    cfg = sst2_experiment("e2e-tiny", ("llama", "t5"), data=data, rows=rows, max_length=48, shard_rows=32)
    overrides = {
        "score.rows_per_chunk": 24,
        "score.min_fires": 2,
        "train": {
            "Cs": [0.1, 1.0],
            "poolings": ["mean", "first"],
            "fusion": {
                "inputs": ["llama:-1:mean", "llama:-2:mean", "t5:-1:mean"],
                "average": ["llama:-1:mean", "llama:-2:mean"],
                "width": 16,
                "hidden": 16,
                "epochs": 5,
                "patience": 2,
            },
        },
    }
    return apply_overrides(cfg, overrides)


def write_config(folder: Path, *, rows: int = 80, name: str = "tiny.toml") -> Path:
    return config_factory.write_config(folder / name, tiny_experiment(rows=rows))


def load(path: Path):
    from pipeline.config import load_config

    return load_config(path)


_CACHE: dict[str, Path] = {}


def extracted_store(tmp_path_factory) -> tuple[Path, Path]:
    """(config path, store dir) of the session's tiny extracted store; built on first use."""
    if "store" not in _CACHE:
        from pipeline import orchestrate

        base = tmp_path_factory.mktemp("tiny_extracted")
        cfg_path = write_config(base)
        store_dir = base / "store"
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            orchestrate.extract(load(cfg_path), str(store_dir), progress=False)
        finally:
            torch.set_num_threads(previous)
        _CACHE["config"], _CACHE["store"] = cfg_path, store_dir
    return _CACHE["config"], _CACHE["store"]


def copy_store(tmp_path_factory, name: str) -> tuple[Path, Path]:
    """A private writable copy of the extracted store, with its config."""
    cfg_path, store_dir = extracted_store(tmp_path_factory)
    dst = tmp_path_factory.mktemp(name) / "store"
    shutil.copytree(store_dir, dst)
    return cfg_path, dst


def trained_store(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(config path, store dir, out dir) after score and train on a copy of the extracted store; built once."""
    if "trained" not in _CACHE:
        from pipeline import orchestrate

        cfg_path, store_dir = copy_store(tmp_path_factory, "tiny_trained")
        out = store_dir.parent / "out"
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cfg = load(cfg_path)
            orchestrate.score(cfg, str(store_dir), out, progress=False)
            orchestrate.train(cfg, str(store_dir), out, progress=False)
        finally:
            torch.set_num_threads(previous)
        _CACHE["trained"] = (cfg_path, store_dir, out)
    return _CACHE["trained"]
