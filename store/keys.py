"""Content keys: canonical fingerprints of descriptions, and the names the store accepts.

A key must depend only on what determines the stored bytes, so the serialisation is canonical
(sorted keys, compact separators, ASCII, repr floats) and anything that cannot be serialised
canonically raises instead of falling back to a random or time-based value.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

import numpy as np

_KEY_RE = re.compile(r"[0-9a-f]{16,64}")
_SHARD_RE = re.compile(r"shard_(\d{5})\.(h5|parquet)")


def _canonical(obj: Any, where: str) -> Any:
    """Return a JSON-ready copy of `obj` with numpy scalars unwrapped; raise on anything else."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.generic) and not isinstance(obj, (np.void, np.object_)):
        return _canonical(obj.item(), where)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"cannot fingerprint non-finite float {obj!r} at {where}; use a string such as 'inf'")
        return float(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"cannot fingerprint dict key {k!r} of type {type(k).__name__} at {where}; keys must be str")
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(
        f"cannot fingerprint object of type {type(obj).__name__} at {where}; convert it to dict/list/str/int/float/bool/None first"
    )


def canonical_json(obj: Any) -> str:
    """The canonical JSON text of `obj` (what `fingerprint` hashes)."""
    return json.dumps(_canonical(obj, "$"), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def fingerprint(obj: Any) -> str:
    """sha256 hex of the canonical JSON of `obj`; equal inputs in any key order give equal keys."""
    return hashlib.sha256(canonical_json(obj).encode("ascii")).hexdigest()


def validate_key(key: Any) -> str:
    """Return `key` if it is a safe entry key (16-64 lowercase hex chars), else raise ValueError."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid store key {key!r}: expected 16-64 lowercase hex characters, e.g. fingerprint(description)")
    return key


def validate_name(name: Any) -> str:
    """Return `name` if it is a plain file name inside an entry (no '/', '..', absolute path), else ValueError."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name.startswith("..")
    ):
        raise ValueError(f"invalid entry file name {name!r}: use a plain name like 'head.json' (no '/', '..', absolute paths)")
    return name


def shard_name(index: int, ext: str) -> str:
    """File name of shard `index` with extension 'h5' or 'parquet'."""
    return f"shard_{index:05d}.{ext}"


def parse_shard_name(name: str) -> tuple[int, str] | None:
    """(index, ext) if `name` is a shard file name, else None."""
    m = _SHARD_RE.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else None
