"""The heads' on-store format: safetensors for arrays, JSON for everything else.

Every head (probe, concat, fusion, LLMEmbed) is two blobs, ``head.safetensors`` and
``head.json``; a heads entry stores them as ``<stem>.safetensors`` and ``<stem>.json``.
Train writes them and predict reads them through this module, so the format has one owner.
Nothing executable is ever written or read (no pickle), so a head fetched from a shared
store can be loaded without trusting whoever wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

__all__ = [
    "TENSORS_NAME",
    "META_NAME",
    "SUFFIXES",
    "pack",
    "unpack",
    "check_format",
    "entry_files",
    "read_entry_head",
    "labels_to_json",
    "labels_from_json",
]

TENSORS_NAME = "head.safetensors"
META_NAME = "head.json"
SUFFIXES = ("safetensors", "json")
"""File suffixes of one head inside a heads entry, in :data:`TENSORS_NAME`, :data:`META_NAME` order."""


def pack(arrays: Mapping[str, np.ndarray], meta: Mapping) -> dict[str, bytes]:
    """Serialise arrays and metadata to ``{'head.safetensors': ..., 'head.json': ...}``."""
    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    return {
        TENSORS_NAME: st_save(tensors),
        META_NAME: json.dumps(meta, sort_keys=True, indent=1, allow_nan=True).encode("utf-8"),
    }


def unpack(blobs: Mapping[str, bytes]) -> tuple[dict[str, np.ndarray], dict]:
    """Inverse of :func:`pack`."""
    missing = [k for k in (TENSORS_NAME, META_NAME) if k not in blobs]
    if missing:
        raise ValueError(f"head bytes lack {missing}; got keys {sorted(blobs)}")
    arrays = st_load(bytes(blobs[TENSORS_NAME]))
    meta = json.loads(bytes(blobs[META_NAME]).decode("utf-8"))
    return arrays, meta


def check_format(meta: Mapping, fmt: str, version: int, *, what: str = "head") -> None:
    """Refuse metadata of another kind of head, or of another version of this one."""
    if meta.get("format") != fmt or meta.get("version") != version:
        raise ValueError(f"not a {fmt} v{version} {what}: format={meta.get('format')!r} version={meta.get('version')!r}")


def entry_files(stem: str, blobs: Mapping[str, bytes]) -> dict[str, bytes]:
    """A head's blobs under their file names in a heads entry (``<stem>.safetensors``, ``<stem>.json``)."""
    return {f"{stem}.{name.split('.', 1)[1]}": data for name, data in blobs.items()}


def read_entry_head(entry, stem: str) -> dict[str, bytes]:
    """The blobs of head ``stem`` read back from a heads entry; inverse of :func:`entry_files`."""
    return {name: entry.read_file(f"{stem}.{suffix}") for name, suffix in zip((TENSORS_NAME, META_NAME), SUFFIXES)}


def labels_to_json(classes: np.ndarray) -> dict:
    """Encode class labels (ints, floats, bools or strings) losslessly for JSON."""
    classes = np.asarray(classes)
    if classes.dtype.kind == "O" and all(isinstance(c, str) for c in classes.tolist()):
        classes = classes.astype(str)
    if classes.dtype.kind not in "biufU":
        raise ValueError(f"class labels of dtype {classes.dtype} cannot be saved; use ints, floats, bools or str")
    return {"values": classes.tolist(), "dtype": classes.dtype.str}


def labels_from_json(obj: Mapping) -> np.ndarray:
    """Inverse of :func:`labels_to_json`."""
    return np.asarray(obj["values"], dtype=np.dtype(obj["dtype"]))
