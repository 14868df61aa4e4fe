"""Helpers shared by the stage-runner and end-to-end tests: a tiny config, a real extracted store.

The extracted store (2 tiny random models x 3 splits x 80 rows, shard_rows 32) is built once
per test session and reused read-only; tests that write (score, train) copy it first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "sst2"
KEYWORDS = ROOT / "configs" / "keywords" / "stem.txt"

TINY_TOML = """\
name = "e2e-tiny"
seed = 0

[data]
name = "sst2"
path = "{data}"
splits = ["train", "dev", "test"]
limit = {rows}

[[models]]
name = "llama"
source = "tiny-random-llama"

[[models]]
name = "t5"
source = "tiny-random-t5"

[extract]
max_length = 48
shard_rows = 32

[score]
keywords = "{keywords}"
rows_per_chunk = 24
min_fires = 2

[train]
Cs = [0.1, 1.0]
poolings = ["mean", "first"]

[train.fusion]
inputs = ["llama:-1:mean", "llama:-2:mean", "t5:-1:mean"]
average = ["llama:-1:mean", "llama:-2:mean"]
width = 16
hidden = 16
epochs = 5
patience = 2
"""


def write_config(folder: Path, *, rows: int = 80, name: str = "tiny.toml", extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(TINY_TOML.format(data=DATA, rows=rows, keywords=KEYWORDS) + extra, encoding="utf-8")
    return path


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
