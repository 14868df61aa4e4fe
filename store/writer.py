"""EntryWriter: write shards and artifact files of one entry, then commit it with a manifest.

Every file is built in memory, written to the store's tmp area and published by rename, so a reader
(or a crashed run) never sees a half-written file; the manifest is published last and is the only
completion marker. Several processes may write disjoint or overlapping shards of one entry: the
files are deterministic, publishing never overwrites, and the first manifest wins.
"""

from __future__ import annotations

import contextlib
import getpass
import io
import json
import logging
import socket
import time
import weakref
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import layout
from . import manifest as mf
from .entry import Entry, open_h5
from .errors import CorruptEntryError, StoreError, plural
from .fs import StoreFS
from .keys import canonical_json, parse_shard_name, shard_name, validate_key, validate_name
from .lease import Lease, WriterPresence

log = logging.getLogger(__name__)


def _dataset_name(name: Any) -> str:
    """A dataset path like 'hidden/mean': non-empty segments, no '.' or '..'."""
    if not isinstance(name, str) or not name or name.startswith("/") or any(seg in ("", ".", "..") for seg in name.split("/")):
        raise ValueError(f"invalid dataset name {name!r}: use slash paths like 'hidden/mean'")
    return name


def _attr_value(value: Any, where: str) -> Any:
    """HDF5-storable attribute value; dicts/lists of mixed types are stored as canonical JSON text."""
    if isinstance(value, (str, bool, int, float, np.generic, np.ndarray)):
        return value
    if isinstance(value, (list, tuple)):
        arr = np.asarray(value)
        if arr.dtype.kind in "biuf":
            return arr
    if value is None or isinstance(value, (dict, list, tuple)):
        return canonical_json(value)
    raise TypeError(f"attribute {where} has unsupported type {type(value).__name__}; use numbers, strings or arrays")


def _who(code_version: str) -> dict[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"user": user, "host": socket.gethostname(), "code_version": code_version}


class EntryWriter:
    """Writes one entry; obtain it from `Store.writer(key, description, n_shards=...)`."""

    def __init__(
        self,
        sfs: StoreFS,
        key: str,
        description: dict,
        *,
        n_shards: int,
        code_version: str = "unknown",
        compression: str | None = None,
    ):
        self.key = validate_key(key)
        if not isinstance(description, dict):
            raise TypeError(f"description of entry {key} must be a dict, got {type(description).__name__}")
        self._description_json = canonical_json(description)
        self.description = json.loads(self._description_json)
        if not isinstance(n_shards, int) or isinstance(n_shards, bool) or n_shards < 0:
            raise ValueError(f"n_shards={n_shards!r} for entry {key}: expected an integer >= 0")
        self.n_shards = n_shards
        self.code_version = code_version
        self.compression = compression
        self._sfs = sfs
        self._dir = layout.entry_dir(sfs, key)
        self._entry_lease: Lease | None = None
        sfs.ensure_writable()
        for path in (sfs.join(layout.TMP), sfs.join(layout.LEASES)):
            sfs.makedirs(path)
        # announced before the first file of the entry, so gc never deletes under this writer
        self._presence = WriterPresence(sfs, self.key).acquire()
        self._finalizer = weakref.finalize(self, self._presence.release)
        sfs.makedirs(self._dir)

    def __repr__(self) -> str:
        return f"EntryWriter({self._sfs.url!r}, key={self.key!r}, n_shards={self.n_shards})"

    def __enter__(self) -> EntryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Withdraw this writer's lease: an unfinished entry then becomes gc-able after the grace period."""
        self._presence.release()

    def _present(self) -> None:
        """Re-announce the writer if it was closed and is used again."""
        self._presence.acquire()

    # shards -------------------------------------------------------------------------------------------

    def committed(self) -> bool:
        return self._sfs.exists(layout.entry_file(self._sfs, self.key, mf.MANIFEST_NAME))

    def done_shards(self) -> set[int]:
        """Shards whose HDF5 and Parquet files are both published (a resumed run skips them)."""
        seen: dict[int, set[str]] = {}
        for item in self._sfs.listdir(self._dir):
            parsed = parse_shard_name(item["basename"])
            if parsed:
                seen.setdefault(parsed[0], set()).add(parsed[1])
        return {i for i, exts in seen.items() if exts == {"h5", "parquet"}}

    def write_shard(
        self,
        index: int,
        arrays: dict[str, np.ndarray],
        table: pd.DataFrame,
        *,
        row_start: int,
        attrs: dict[str, dict] | None = None,
    ) -> None:
        """Write and publish shard `index`; a shard that is already published is left as it is."""
        if not isinstance(index, int) or not 0 <= index < self.n_shards:
            raise ValueError(f"shard index {index!r} out of range for entry {self.key} with n_shards={self.n_shards}")
        if not isinstance(row_start, int) or row_start < 0:
            raise ValueError(f"row_start={row_start!r} for shard {index} of entry {self.key}: expected an integer >= 0")
        if not isinstance(table, pd.DataFrame):
            raise TypeError(f"table for shard {index} of entry {self.key} must be a pandas DataFrame, got {type(table).__name__}")
        attrs = attrs or {}
        unknown = sorted(set(attrs) - set(arrays))
        if unknown:
            raise ValueError(f"attrs for shard {index} of entry {self.key} name datasets not written: {unknown}")
        arrays = {_dataset_name(k): np.asarray(v) for k, v in arrays.items()}
        self._present()
        if index in self.done_shards():
            log.debug("entry %s shard %d already published; skipping", self.key, index)
            return
        n_rows = len(table)
        table_bytes = self._parquet_bytes(table, row_start=row_start, n_rows=n_rows)
        h5_bytes = self._h5_bytes(arrays, attrs, row_start=row_start, n_rows=n_rows)
        self._put(shard_name(index, "parquet"), table_bytes)
        self._put(shard_name(index, "h5"), h5_bytes)
        log.debug("entry %s shard %d published (%d rows)", self.key, index, n_rows)

    def _h5_bytes(self, arrays: dict[str, np.ndarray], attrs: dict[str, dict], *, row_start: int, n_rows: int) -> bytes:
        """HDF5 image of a shard; no timestamps and fixed layout, so equal inputs give equal bytes."""
        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            f.attrs["key"] = self.key
            f.attrs["description"] = self._description_json
            f.attrs["row_start"] = np.int64(row_start)
            f.attrs["n_rows"] = np.int64(n_rows)
            f.attrs["format_version"] = np.int64(mf.FORMAT_VERSION)
            for name in sorted(arrays):
                arr = arrays[name]
                kwargs: dict[str, Any] = {"track_times": False}
                if self.compression and arr.ndim and arr.size:
                    kwargs.update(compression=self.compression, chunks=(min(arr.shape[0], 256), *arr.shape[1:]))
                ds = f.create_dataset(name, data=arr, **kwargs)
                for attr_name, value in sorted((attrs.get(name) or {}).items()):
                    ds.attrs[attr_name] = _attr_value(value, f"{name}.{attr_name}")
        return buf.getvalue()

    def _parquet_bytes(self, table: pd.DataFrame, *, row_start: int, n_rows: int) -> bytes:
        """Parquet image of a shard's rows with the key and description in the schema metadata."""
        arrow = pa.Table.from_pandas(table, preserve_index=False)
        meta = dict(arrow.schema.metadata or {})
        meta.update(
            {
                b"store.key": self.key.encode(),
                b"store.description": self._description_json.encode(),
                b"store.row_start": str(row_start).encode(),
                b"store.n_rows": str(n_rows).encode(),
            }
        )
        buf = io.BytesIO()
        pq.write_table(arrow.replace_schema_metadata(meta), buf)
        return buf.getvalue()

    # artifact files -------------------------------------------------------------------------------------

    def write_file(self, name: str, data: bytes) -> None:
        """Publish an artifact file (e.g. 'head.safetensors'); the same name with other bytes is an error."""
        validate_name(name)
        if parse_shard_name(name) or name == mf.MANIFEST_NAME:
            raise ValueError(f"file name {name!r} is reserved for shards/manifest; use another name")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data for {name} must be bytes, got {type(data).__name__}")
        data = bytes(data)
        self._present()
        if not self._put(name, data):
            existing = self._sfs.cat(layout.entry_file(self._sfs, self.key, name))
            if existing != data:
                raise StoreError(
                    f"entry {self.key} already has {name} with different content; entries are write-once, "
                    "change the description to get a new key"
                )

    def _put(self, name: str, data: bytes) -> bool:
        self._sfs.makedirs(self._dir)  # gc may have removed an empty, stale entry directory
        return self._sfs.publish_bytes(data, layout.entry_file(self._sfs, self.key, name), layout.tmp_path(self._sfs, self.key, name))

    # commit ---------------------------------------------------------------------------------------------

    def commit(self, expected_shards: int | None = None) -> Entry:
        """Hash every file and publish manifest.json last; if someone committed first, return theirs."""
        try:
            return self._commit(expected_shards)
        finally:
            self.close()

    def _commit(self, expected_shards: int | None) -> Entry:
        if self.committed():
            return Entry(self._sfs, self.key)
        self._present()
        if expected_shards is not None and expected_shards != self.n_shards:
            raise StoreError(
                f"entry {self.key}: expected {expected_shards} shards but the writer was created with n_shards={self.n_shards}"
            )
        listing = sorted(item["basename"] for item in self._sfs.listdir(self._dir))
        done = self.done_shards()
        missing = sorted(set(range(self.n_shards)) - done)
        if missing:
            raise StoreError(
                f"cannot commit entry {self.key}: shards {missing} are not written; write them (done shards are skipped on resume) and commit again"
            )
        extra = sorted(i for i in done if i >= self.n_shards)
        if extra:
            raise StoreError(
                f"cannot commit entry {self.key}: shards {extra} exceed n_shards={self.n_shards}; remove the entry and rebuild it"
            )
        shards = [self._shard_record(i) for i in range(self.n_shards)]
        expected_start = 0
        for rec in shards:
            if rec["row_start"] != expected_start:
                raise StoreError(
                    f"cannot commit entry {self.key}: shard {rec['index']} starts at row {rec['row_start']}, expected {expected_start}; "
                    "row_start must continue the previous shard"
                )
            expected_start += rec["n_rows"]
        files = []
        for name in listing:
            if parse_shard_name(name) or name == mf.MANIFEST_NAME:
                continue
            sha, size = self._sfs.sha256(layout.entry_file(self._sfs, self.key, name))
            files.append({"name": name, "sha256": sha, "bytes": size})
        n_rows = expected_start
        if not shards and any(f["name"] == "table.parquet" for f in files):
            with self._sfs.open(layout.entry_file(self._sfs, self.key, "table.parquet")) as fh:
                n_rows = pq.read_metadata(fh).num_rows
        manifest = {
            "format_version": mf.FORMAT_VERSION,
            "key": self.key,
            "description": self.description,
            "created": time.time(),
            "created_by": _who(self.code_version),
            "n_rows": n_rows,
            "shards": shards,
            "files": files,
        }
        if self._put(mf.MANIFEST_NAME, mf.dumps(manifest)):
            log.info("committed entry %s (%s, %s)", self.key, plural(len(shards), "shard"), plural(n_rows, "row"))
        else:
            log.info("entry %s was committed by another writer; using theirs", self.key)
        return Entry(self._sfs, self.key)

    def _shard_record(self, index: int) -> dict[str, Any]:
        h5_path = layout.entry_file(self._sfs, self.key, shard_name(index, "h5"))
        pq_path = layout.entry_file(self._sfs, self.key, shard_name(index, "parquet"))
        with open_h5(self._sfs, h5_path) as f:
            row_start, n_rows = int(f.attrs["row_start"]), int(f.attrs["n_rows"])
        with self._sfs.open(pq_path) as fh:
            table_rows = pq.read_metadata(fh).num_rows
        if table_rows != n_rows:
            raise CorruptEntryError(f"{h5_path} says {n_rows} rows but {pq_path} has {table_rows}; delete both and re-write shard {index}")
        sha, size = self._sfs.sha256(h5_path)
        tsha, tsize = self._sfs.sha256(pq_path)
        return {
            "index": index,
            "file": shard_name(index, "h5"),
            "table": shard_name(index, "parquet"),
            "row_start": row_start,
            "n_rows": n_rows,
            "sha256": sha,
            "bytes": size,
            "table_sha256": tsha,
            "table_bytes": tsize,
        }

    # leases -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, ttl: float = 600) -> Iterator[EntryWriter]:
        """Hold the per-key lease while writing, so others and `gc` see the entry is in progress.

        Advisory, not a lock: a second `lease()` on the key raises StoreError naming the holder; an
        expired lease (crashed writer) is taken over. Call `refresh_lease()` during long work.
        For several processes on one entry use `shard_lease`, which lets them split the shards.
        """
        lease = Lease(self._sfs, self.key, ttl, what=f"entry {self.key}")
        lease.acquire()
        self._entry_lease = lease
        try:
            yield self
        finally:
            lease.release()
            self._entry_lease = None

    def refresh_lease(self, ttl: float | None = None) -> None:
        """Push the entry lease's expiry forward; StoreError if it was lost (expired and taken over)."""
        lease = self._entry_lease
        if lease is None:
            raise StoreError(f"refresh_lease on entry {self.key} without holding its lease; use `with writer.lease():`")
        if ttl is not None:
            lease.ttl = float(ttl)
        lease.refresh()

    def shard_lease(self, index: int, ttl: float = 600, *, heartbeat: bool = True) -> Lease | None:
        """Claim shard `index` before computing it: a held Lease (release it once the shard is
        published), or None if another writer holds a live lease on it (skip it and come back).

        With `heartbeat` the lease is refreshed every ttl/3 seconds on a daemon thread, so a long
        shard keeps its claim while a crashed writer's claim expires after `ttl` (at once on the
        same host, where a dead pid is recognised). Also keeps `gc` off the unfinished entry.
        """
        if not isinstance(index, int) or not 0 <= index < self.n_shards:
            raise ValueError(f"shard index {index!r} out of range for entry {self.key} with n_shards={self.n_shards}")
        lease = Lease(self._sfs, layout.shard_lease_name(self.key, index), ttl, what=f"shard {index} of entry {self.key}")
        if not lease.try_acquire():
            return None
        return lease.heartbeat() if heartbeat else lease
