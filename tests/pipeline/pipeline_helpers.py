"""Helpers of the project-spine tests (fixtures are in conftest.py): a TOML writer, overrides, data writers.

A uniquely named module rather than ``from conftest import``: several test folders have a conftest.py.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

DELETE = object()  # an override value that removes the key

TRAIN_ROWS = [("a good film", 1), ("a bad film", 0), ("great fun", 1), ("dull and slow", 0)]
DEV_ROWS = [("fine work", 1), ("poor work", 0)]
TEST_ROWS = [("lovely", 1), ("awful", 0)]


def base_config(data_path: str) -> dict:
    """A small valid experiment as a plain dict (what the TOML file holds)."""
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


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(data: dict, prefix: str = "") -> str:
    """Enough of a TOML writer for configs: scalars, lists, tables, arrays of tables."""
    scalars, tables, arrays = [], [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            scalars.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(scalars) + ("\n" if scalars else "")
    for k, v in tables:
        name = f"{prefix}{k}"
        out += f"\n[{name}]\n" + to_toml(v, f"{name}.")
    for k, items in arrays:
        name = f"{prefix}{k}"
        for item in items:
            out += f"\n[[{name}]]\n" + to_toml(item, f"{name}.")
    return out


def apply_overrides(data: dict, overrides: dict) -> dict:
    """Dotted keys; digits index lists (``models.0.source``); DELETE removes the key."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
        key = int(leaf) if leaf.isdigit() else leaf
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return data


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
