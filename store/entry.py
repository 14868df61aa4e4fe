"""Entry: a committed, read-only entry; arrays come back as lazy Dask arrays, one chunk per shard, or with ``read`` as one numpy array.

Shards are opened inside Dask tasks from (store url, storage options, path) only, so graphs pickle
cleanly to dask.distributed workers and no h5py handle ever crosses a process boundary.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from . import layout
from . import manifest as mf
from .errors import CorruptEntryError, StoreError
from .fs import StoreFS
from .keys import validate_key, validate_name

if TYPE_CHECKING:  # imported where used: a cached run never needs dask, and Dask workers that
    import dask.array as da  # only read shards stay small without pandas and pyarrow
    import pandas as pd


@contextlib.contextmanager
def open_h5(sfs: StoreFS, path: str) -> Iterator[h5py.File]:
    """Open an HDF5 file read-only without file locking; remote files through byte-range file objects."""
    local = sfs.local_path(path)
    if local is not None:
        with h5py.File(local, "r", locking=False) as f:
            yield f
    else:
        with sfs.open_random_access(path) as fh, h5py.File(fh, "r", locking=False) as f:
            yield f


def _read_block(
    url: str, storage_options: dict, path: str, name: str, start: int | None, stop: int | None, expected_rows: int | None
) -> np.ndarray:
    """Dask task: rows [start, stop) of dataset `name` in one shard (the whole dataset if start is None)."""
    sfs = StoreFS(url, storage_options)
    with open_h5(sfs, path) as f:
        ds = _dataset(f, path, name, expected_rows)
        return ds[()] if start is None else ds[start:stop]


def _dataset(f: h5py.File, path: str, name: str, expected_rows: int | None) -> h5py.Dataset:
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise CorruptEntryError(f"{path} has no dataset {name!r}; re-run extract to rebuild the entry")
    ds = f[name]
    if expected_rows is not None and (ds.ndim == 0 or ds.shape[0] != expected_rows):
        raise CorruptEntryError(
            f"{path}: dataset {name!r} has shape {ds.shape}, expected {expected_rows} rows; use per_shard() for per-shard datasets, else re-run extract to rebuild the entry"
        )
    return ds


def _attrs_dict(attrs: h5py.AttributeManager) -> dict[str, Any]:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, bytes):
            v = v.decode()
        out[k] = v
    return out


class Entry:
    """A committed entry of a store; obtain it from `Store.open(key)`."""

    def __init__(self, sfs: StoreFS, key: str, manifest: dict[str, Any] | None = None):
        self.key = validate_key(key)
        self._sfs = sfs
        if manifest is None:
            try:
                _, manifest = mf.read(sfs, key)
            except FileNotFoundError:
                raise StoreError(f"no committed entry {key} in store {sfs.url}; run the stage that builds it") from None
        self.manifest = manifest
        self.description: dict[str, Any] = manifest["description"]
        self.n_rows: int = manifest["n_rows"]
        self.n_shards: int = len(manifest["shards"])

    def __repr__(self) -> str:
        return f"Entry({self._sfs.url!r}, key={self.key!r}, n_rows={self.n_rows}, n_shards={self.n_shards})"

    def _path(self, name: str) -> str:
        return layout.entry_file(self._sfs, self.key, validate_name(name))

    def _shard_paths(self) -> list[str]:
        if not self.n_shards:
            raise StoreError(f"entry {self.key} has no shards (files: {self.files}); use read_file()")
        return [self._path(s["file"]) for s in self.manifest["shards"]]

    def check_sizes(self) -> None:
        """Every file of the manifest is there with its committed size (a stat each, no read).

        The cheap part of ``Store.verify``: readers that hash as they read (``shard_sources`` with
        ``store.scan``) call it first, so a missing or truncated file fails before any work.
        """
        for name, _, size in mf.file_records(self.manifest):
            path = self._path(name)
            try:
                actual = self._sfs.size(path)
            except FileNotFoundError:
                raise CorruptEntryError(f"{path}: missing") from None
            if actual != size:
                raise CorruptEntryError(f"{path}: {'size mismatch (truncated?)' if actual < size else 'size mismatch'}")

    def shard_sources(self) -> list[dict[str, Any]]:
        """Per shard, what a Dask task needs to scan it (``store.scan.scan_shard``): plain, picklable values."""
        return [
            {
                "url": self._sfs.url,
                "storage_options": self._sfs.storage_options,
                "path": path,
                "sha256": shard["sha256"],
                "size": shard["bytes"],
                "index": shard["index"],
                "row_start": shard["row_start"],
                "n_rows": shard["n_rows"],
            }
            for shard, path in zip(self.manifest["shards"], self._shard_paths())
        ]

    @property
    def files(self) -> list[str]:
        """Artifact files (not shards) of this entry."""
        return [f["name"] for f in self.manifest["files"]]

    def datasets(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Every dataset in shard 0 as name -> (shape without the first axis, dtype).

        The first axis is dropped for per-shard datasets too; `per_shard(name).shape` gives their full shape.
        """
        out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        with open_h5(self._sfs, self._shard_paths()[0]) as f:

            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Dataset):
                    out[name] = (tuple(obj.shape[1:]), obj.dtype)

            f.visititems(visit)
        return dict(sorted(out.items()))

    def _meta(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        with open_h5(self._sfs, self._shard_paths()[0]) as f:
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise KeyError(f"entry {self.key} has no dataset {name!r}; available: {sorted(self.datasets())}")
            return tuple(f[name].shape), f[name].dtype

    def _row_meta(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        """``_meta`` of a dataset with one row per text; ValueError for a scalar or per-shard one."""
        shape0, dtype = self._meta(name)
        if not shape0:
            raise ValueError(f"dataset {name!r} of entry {self.key} is a scalar; use shard_attrs or per_shard")
        rows = self.manifest["shards"][0]["n_rows"]
        if shape0[0] != rows:
            raise ValueError(
                f"dataset {name!r} of entry {self.key} is not one row per text (shard 0 holds {shape0} for its {rows} rows): "
                "a per-shard dataset (use per_shard), or a damaged entry (`store verify` checks it)"
            )
        return shape0, dtype

    def array(self, name: str, rows_per_chunk: int | None = None) -> da.Array:
        """Row-wise dataset `name` over all shards, concatenated on axis 0, lazily (one chunk per shard)."""
        import dask
        import dask.array as da

        if rows_per_chunk is not None and (not isinstance(rows_per_chunk, int) or rows_per_chunk < 1):
            raise ValueError(f"rows_per_chunk={rows_per_chunk!r}: expected a positive integer")
        shape0, dtype = self._row_meta(name)
        tail = shape0[1:]
        blocks = []
        token = dask.base.tokenize(self._sfs.url, self.key, name, rows_per_chunk)
        for shard, path in zip(self.manifest["shards"], self._shard_paths()):
            n = shard["n_rows"]
            step = rows_per_chunk or max(n, 1)
            for start in range(0, n, step):
                stop = min(start + step, n)
                task = dask.delayed(_read_block, pure=True)(
                    self._sfs.url,
                    self._sfs.storage_options,
                    path,
                    name,
                    start,
                    stop,
                    n,
                    dask_key_name=f"store-read-{token}-{shard['index']}-{start}",
                )
                blocks.append(da.from_delayed(task, shape=(stop - start, *tail), dtype=dtype))
        if not blocks:
            return da.zeros((0, *tail), dtype=dtype)
        return da.concatenate(blocks, axis=0)

    def read(self, name: str) -> np.ndarray:
        """Row-wise dataset `name` over all shards, read now: what ``array(name).compute()`` returns.

        Each shard is read straight into its rows of one preallocated array, so a caller that wants
        the whole dataset in memory pays no Dask graph, no concatenation copy and no second allocation
        (about 3x faster than ``array(name).compute()`` on the default store).
        """
        shape0, dtype = self._row_meta(name)
        shards = self.manifest["shards"]
        out = np.empty((sum(s["n_rows"] for s in shards), *shape0[1:]), dtype=dtype)
        lo = 0
        for shard, path in zip(shards, self._shard_paths()):
            n = shard["n_rows"]
            with open_h5(self._sfs, path) as f:
                ds = _dataset(f, path, name, n)
                if ds.shape[1:] != out.shape[1:]:
                    raise CorruptEntryError(f"{path}: dataset {name!r} has shape {ds.shape}, shard 0 has rows of shape {out.shape[1:]}")
                if n:
                    ds.read_direct(out, dest_sel=np.s_[lo : lo + n])
            lo += n
        return out

    def per_shard(self, name: str) -> da.Array:
        """Per-shard dataset `name` (e.g. firing counts) stacked to shape (n_shards, ...)."""
        import dask
        import dask.array as da

        shape0, dtype = self._meta(name)
        token = dask.base.tokenize(self._sfs.url, self.key, name)
        blocks = [
            da.from_delayed(
                dask.delayed(_read_block, pure=True)(
                    self._sfs.url,
                    self._sfs.storage_options,
                    path,
                    name,
                    None,
                    None,
                    None,
                    dask_key_name=f"store-shard-{token}-{i}",
                ),
                shape=shape0,
                dtype=dtype,
            )
            for i, path in enumerate(self._shard_paths())
        ]
        return da.stack(blocks, axis=0)

    def shard_attrs(self, name: str) -> list[dict[str, Any]]:
        """HDF5 attributes of dataset `name` in every shard, in shard order."""
        out = []
        for path in self._shard_paths():
            with open_h5(self._sfs, path) as f:
                if name not in f:
                    raise CorruptEntryError(f"{path} has no dataset {name!r}; re-run extract to rebuild the entry")
                out.append(_attrs_dict(f[name].attrs))
        return out

    def table(self, *, verify: bool = False) -> pd.DataFrame:
        """Row table: the shard Parquet tables concatenated, or the 'table.parquet' file of a non-sharded entry.

        ``verify=True`` hashes each shard table from the bytes it parses (one read) and raises
        CorruptEntryError naming the file if it differs from the manifest.
        """
        import pandas as pd
        import pyarrow.parquet as pq

        if self.n_shards:
            parts = []
            for shard in self.manifest["shards"]:
                path = self._path(shard["table"])
                if verify:
                    data = self._sfs.cat(path)
                    if len(data) != shard["table_bytes"] or hashlib.sha256(data).hexdigest() != shard["table_sha256"]:
                        reason = "sha256 mismatch" if len(data) == shard["table_bytes"] else "size mismatch"
                        raise CorruptEntryError(f"{path}: {reason}: the row table changed after it was committed")
                    parts.append(pq.read_table(io.BytesIO(data)).to_pandas())
                    continue
                with self._sfs.open(path, "rb") as fh:
                    parts.append(pq.read_table(fh).to_pandas())
            return pd.concat(parts, ignore_index=True)
        if "table.parquet" in self.files:
            return pq.read_table(io.BytesIO(self.read_file("table.parquet"))).to_pandas()
        raise StoreError(f"entry {self.key} has neither shards nor table.parquet (files: {self.files})")

    def read_file(self, name: str) -> bytes:
        """Bytes of artifact file `name` listed in the manifest."""
        if name not in self.files:
            raise KeyError(f"entry {self.key} has no file {name!r}; files: {self.files}")
        return self._sfs.cat(self._path(name))
