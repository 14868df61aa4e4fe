"""Safe persistence for heads: safetensors for arrays, JSON for everything else.

Nothing executable is ever written or read (no pickle), so a head fetched
from a shared store can be loaded without trusting whoever wrote it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

__all__ = [
    "TENSORS_NAME",
    "META_NAME",
    "pack",
    "unpack",
    "write_dir",
    "read_dir",
    "labels_to_json",
    "labels_from_json",
]

TENSORS_NAME = "head.safetensors"
META_NAME = "head.json"


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


def write_dir(blobs: Mapping[str, bytes], path: str | os.PathLike) -> Path:
    """Write each blob into directory ``path``, atomically per file; JSON last."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in sorted(blobs, key=lambda n: n == META_NAME):
        fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blobs[name])
            os.replace(tmp, path / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def read_dir(path: str | os.PathLike) -> dict[str, bytes]:
    """Read the two head files back from directory ``path``."""
    path = Path(path)
    return {name: (path / name).read_bytes() for name in (TENSORS_NAME, META_NAME)}


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


class DirectoryPersistence:
    """``save``/``load`` of a head through a directory, given its ``to_bytes``/``from_bytes``."""

    def save(self, path: str | os.PathLike) -> None:
        """Write ``head.safetensors`` and ``head.json`` into directory ``path``."""
        write_dir(self.to_bytes(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs):
        """Load a head written by :meth:`save` (keyword arguments go to ``from_bytes``)."""
        return cls.from_bytes(read_dir(path), **kwargs)
