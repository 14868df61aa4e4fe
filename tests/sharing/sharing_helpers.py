"""Helpers of the sharing tests: a tiny experiment config, `python -m pipeline` children, file digests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import config_factory
import numpy as np
import pandas as pd
from config_factory import sst2_experiment

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, *, models=("llama", "bert"), limit: int = 60, shard_rows: int = 16) -> Path:
    """A tiny experiment TOML with absolute data and keyword paths (tests run from any directory)."""
    cfg = sst2_experiment("share-tiny", tuple(models), rows=limit, shard_rows=shard_rows)
    overrides = {
        "extract.device": "cpu",
        "score.rows_per_chunk": 24,
        "train": {
            "Cs": [1.0],
            "fusion": {
                "inputs": [f"{models[0]}:-1:mean", f"{models[-1]}:-1:first"],
                "average": [],
                "width": 8,
                "hidden": 8,
                "epochs": 3,
            },
        },
    }
    return config_factory.write_config(path, cfg, overrides)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m pipeline` children: one torch thread each (they share 2 cores)."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
    )
    env.update(extra)
    return env


def start_cli(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run_cli(*args: str, timeout: float = 180, **env: str) -> str:
    proc = start_cli(*args, **env)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"python -m pipeline {' '.join(args)} exited {proc.returncode}:\n{out}"
    return out


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root`."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def make_entry(store, name: str = "bert", n_shards: int = 2, rows: int = 3):
    """A small committed features entry; returns its key."""
    from store import fingerprint

    desc = {"kind": "features", "dataset": {"name": "toy", "split": "train"}, "model": {"name": name}, "n_layers": 2}
    key = fingerprint(desc)
    w = store.writer(key, desc, n_shards=n_shards)
    for i in range(n_shards):
        rng = np.random.default_rng(i)
        w.write_shard(
            i,
            {"hidden/mean": rng.standard_normal((rows, 3, 4)).astype(np.float32)},
            pd.DataFrame({"row": np.arange(i * rows, (i + 1) * rows), "label": rng.integers(0, 2, rows)}),
            row_start=i * rows,
        )
    w.write_file("notes.json", b'{"hello": 1}')
    w.commit()
    return key
