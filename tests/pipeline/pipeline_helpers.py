"""Helpers of the project-spine tests (fixtures are in conftest.py): the base config, data writers.

A uniquely named module rather than ``from conftest import``: several test folders have a conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

TRAIN_ROWS = [("a good film", 1), ("a bad film", 0), ("great fun", 1), ("dull and slow", 0)]
DEV_ROWS = [("fine work", 1), ("poor work", 0)]
TEST_ROWS = [("lovely", 1), ("awful", 0)]


def base_config(data_path: str) -> dict:
    """A small valid experiment as a plain dict (what the TOML file holds; written by tests/config_factory.py)."""
    return {
        "name": "exp",
        "seed": 0,
        "data": {"name": "toy", "path": data_path, "splits": ["train", "dev", "test"]},
        "models": [
            {"name": "bert", "source": "tiny-random-bert"},
            {"name": "llama", "source": "tiny-random-llama"},
        ],
        "extract": {"max_length": 32},
        "train": {"fusion": {"inputs": ["llama:-1:mean", "bert:-1:first"], "average": ["llama:-1:mean"]}},
    }


def write_rows(path: Path, rows, text_column: str = "text", label_column: str = "label") -> Path:
    """Write (text, label) rows in the format named by the file's extension."""
    import csv

    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix
    if ext == ".tsv":
        lines = [f"{text_column}\t{label_column}"] + [f"{t}\t{y}" for t, y in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif ext == ".csv":
        with path.open("w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([text_column, label_column])
            w.writerows(rows)
    elif ext == ".jsonl":
        path.write_text("".join(json.dumps({text_column: t, label_column: y}) + "\n" for t, y in rows), encoding="utf-8")
    elif ext == ".parquet":
        pd.DataFrame({text_column: [t for t, _ in rows], label_column: [y for _, y in rows]}).to_parquet(path)
    else:
        raise ValueError(ext)
    return path
