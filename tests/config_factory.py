"""The one factory for experiment configs in tests: a config is a plain dict, written as TOML here.

Each suite keeps the base experiment it needs (a toy corpus, a slice of SST-2 with tiny random
models, a synthetic store) as a dict built by :func:`sst2_experiment` or by hand, changes it with
dotted overrides (:func:`apply_overrides`), and writes it with :func:`write_config`; the
``config_file`` fixture in ``tests/conftest.py`` does the last two in ``tmp_path``. A uniquely
named module rather than ``from conftest import``: several test folders have a conftest.py.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT / "data" / "sst2"
KEYWORDS = ROOT / "configs" / "keywords" / "stem.txt"

DELETE = object()
"""An override value that removes the key."""


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
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))  # a JSON string is a valid TOML basic string
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
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
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
    """A copy of ``data`` with dotted keys set; digits index lists (``models.0.source``); DELETE removes the key."""
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


def write_config(path: Path, data: dict, overrides: dict | None = None, *, raw: str = "") -> Path:
    """Write ``data`` (with dotted ``overrides``) as TOML at ``path``; ``raw`` is appended as is (malformed files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(apply_overrides(data, overrides or {})) + raw, encoding="utf-8")
    return path


def tiny_models(*names: str) -> list[dict]:
    """``[[models]]`` tables of the in-process tiny random models (``tiny-random-<name>``)."""
    return [{"name": m, "source": f"tiny-random-{m}"} for m in names]


def sst2_experiment(
    name: str,
    models: tuple[str, ...],
    *,
    data: Path | str = SST2,
    rows: int | None = None,
    splits: tuple[str, ...] = ("train", "dev", "test"),
    max_length: int = 32,
    shard_rows: int = 16,
) -> dict:
    """A slice of SST-2 (the first ``rows`` rows of each split) over tiny random models, keywords set by absolute path."""
    corpus: dict = {"name": "sst2", "path": str(data), "splits": list(splits)}
    if rows is not None:
        corpus["limit"] = rows
    return {
        "name": name,
        "seed": 0,
        "data": corpus,
        "models": tiny_models(*models),
        "extract": {"max_length": max_length, "shard_rows": shard_rows},
        "score": {"keywords": str(KEYWORDS)},
    }
