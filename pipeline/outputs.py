"""Output files (tables, plots, report.md) appear whole or not at all, like store files do."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """A matplotlib figure written atomically in the format its suffix names."""
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    return write_atomic(path, buf.getvalue())


def parquet_bytes(df) -> bytes:
    """A DataFrame as Parquet bytes (no index), for the store and for output folders alike."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def write_parquet(df, path: str | os.PathLike) -> Path:
    return write_atomic(path, parquet_bytes(df))
