"""Read a shard once, hashing every byte on the way: verification from the bytes a consumer reads.

``scan_shard`` opens a shard file once, lets the caller look at its HDF5 metadata, then reads the
file front to back in large blocks. Every block goes to SHA-256 (on a helper thread, so hashing
overlaps the caller's arithmetic) and the blocks that hold rows of a wanted dataset are handed to
the caller as numpy views, in row pieces of bounded size. At the end the digest and the byte count
are compared with the manifest's: a shard changed after commit fails the scan with a
``CorruptEntryError`` naming the file, and nothing is read a second time to find out.

Contiguous, uncompressed datasets (what the writer produces without ``compression``) are decoded
straight from the stream; any other dataset is read through h5py, from the same open file, and the
stream still hashes the whole file.

A handle can be kept for a later pass of the same run (``keep``, a ``KeptHandles`` the run owns and
closes): the score stage reads the hidden states a second time for the projections of its
variability statistic, from the handle the scan opened, with positional reads.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from .errors import CorruptEntryError
from .fs import StoreFS

PIECE_BYTES = 2 * 2**20  # bytes per streamed block: two of them in memory per scan

Consumer = Callable[[int, int, np.ndarray], None]


@dataclass(frozen=True)
class Region:
    """Where a row-wise dataset lies in a shard file (offset None: not contiguous, read through h5py)."""

    name: str
    offset: int | None
    shape: tuple[int, ...]
    dtype: str

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.shape[0]


class ShardHandle:
    """One open shard file: positional reads (thread-safe), counted."""

    def __init__(self, sfs: StoreFS, path: str):
        self.path = path
        local = sfs.local_path(path)
        self.fh = open(local, "rb", buffering=0) if local is not None else sfs.open_random_access(path)  # noqa: SIM115 - closed by close()
        self._fd = self.fh.fileno() if local is not None else None
        self._lock = threading.Lock()
        self.bytes_read = 0

    def readinto_at(self, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``offset``; returns the bytes read (fewer only at the end of the file)."""
        got = 0
        while got < len(buf):
            if self._fd is not None:
                n = os.preadv(self._fd, [buf[got:]], offset + got)
            else:
                with self._lock:
                    self.fh.seek(offset + got)
                    data = self.fh.read(len(buf) - got)
                n = len(data)
                buf[got : got + n] = data
            if not n:
                break
            got += n
        self.bytes_read += got
        return got

    def close(self) -> None:
        self.fh.close()


def open_shard(sfs: StoreFS, path: str) -> ShardHandle:
    """The one place a scan opens a shard file (tests count the calls)."""
    return ShardHandle(sfs, path)


class KeptHandles:
    """Shard handles that scans leave open for a later pass of the same run, owned by that run.

    A scan given one adopts its handle here instead of closing it; ``read_rows`` reads through it;
    ``close()`` (or leaving the ``with`` block) closes them all, after which a late scan closes its
    own handle. Lives in one process: a run on a distributed cluster passes none.
    """

    def __init__(self) -> None:
        self._handles: dict[str, ShardHandle] = {}
        self._lock = threading.Lock()
        self._open = True

    def get(self, path: str) -> ShardHandle | None:
        with self._lock:
            return self._handles.get(path)

    def adopt(self, path: str, handle: ShardHandle) -> bool:
        """Keep ``handle`` for ``path`` (closing one kept before); False once closed: the caller closes it."""
        with self._lock:
            if not self._open:
                return False
            old = self._handles.pop(path, None)
            self._handles[path] = handle
        if old is not None and old is not handle:
            old.close()
        return True

    def close(self) -> None:
        with self._lock:
            self._open = False
            handles = list(self._handles.values())
            self._handles.clear()
        for h in handles:
            h.close()

    def __enter__(self) -> KeptHandles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scan_shard(
    url: str,
    storage_options: dict,
    path: str,
    *,
    sha256: str,
    size: int,
    setup: Callable[[h5py.File], tuple[dict[str, Consumer], Any]],
    keep: KeptHandles | None = None,
    piece_bytes: int = PIECE_BYTES,
) -> tuple[Any, dict[str, Region]]:
    """Read shard ``path`` once, front to back, feeding row pieces of wanted datasets to consumers.

    ``setup(f)`` gets the open HDF5 file (metadata and small datasets are read through the same
    handle) and returns ``(consumers, value)``: ``consumers[name](lo, hi, rows)`` receives rows
    [lo, hi) of dataset ``name``, in order, as a read-only view valid during the call. Returns
    ``(value, regions)`` where regions locate every consumed dataset for later positional reads.
    Raises CorruptEntryError naming ``path`` when the bytes read do not hash to ``sha256``.
    """
    sfs = StoreFS(url, storage_options)
    handle = open_shard(sfs, path)
    kept = False
    try:
        try:
            with h5py.File(handle.fh, "r") as f:
                consumers, value = setup(f)
                regions = {name: _region(f, name, size) for name in consumers}
                stream = sorted((r for r in regions.values() if r.offset is not None), key=lambda r: r.offset)
                stream = _non_overlapping(stream)
                for name in consumers:
                    if all(r.name != name for r in stream):
                        _read_through_h5py(f[name], consumers[name], piece_bytes)
            digest, n = _stream(handle, size, stream, consumers, piece_bytes)
        except CorruptEntryError:
            raise
        except Exception:
            # a damaged file can break the parse before the stream got to hash it: hash it now, so the
            # error says what is wrong rather than what HDF5 tripped over
            digest, n = _stream(handle, size, [], {}, piece_bytes)
            if digest != sha256 or n != size:
                _mismatch(path, n, size)
            raise
        if digest != sha256 or n != size:
            _mismatch(path, n, size)
        if keep is not None:
            kept = keep.adopt(path, handle)
        return value, {r.name: r for r in regions.values()}
    finally:
        if not kept:
            handle.close()


def read_rows(
    url: str, storage_options: dict, path: str, region: Region, lo: int, hi: int, *, keep: KeptHandles | None = None
) -> np.ndarray:
    """Rows [lo, hi) of a dataset a scan located, by positional read (the kept handle if there is one)."""
    handle = keep.get(path) if keep is not None else None
    own = handle is None
    if own:
        handle = open_shard(StoreFS(url, storage_options), path)
    try:
        if region.offset is None:
            with h5py.File(handle.fh, "r") as f:
                return f[region.name][lo:hi]
        out = np.empty((hi - lo, *region.shape[1:]), dtype=region.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        if handle.readinto_at(region.offset + lo * region.row_bytes, buf) != len(buf):
            raise CorruptEntryError(f"{path}: size mismatch (truncated?) reading {region.name}; re-run extract to rebuild the entry")
        return out
    finally:
        if own:
            handle.close()


def _mismatch(path: str, n: int, size: int) -> None:
    reason = "sha256 mismatch" if n == size else f"size mismatch ({n} bytes read, the manifest says {size})"
    raise CorruptEntryError(f"{path}: {reason}: the shard changed after it was committed")


def _region(f: h5py.File, name: str, size: int) -> Region:
    ds = f[name]
    if not isinstance(ds, h5py.Dataset) or ds.ndim == 0:
        raise CorruptEntryError(f"{f.filename}: {name!r} is not a row-wise dataset; re-run extract to rebuild the entry")
    offset = ds.id.get_offset()
    contiguous = (
        ds.chunks is None
        and offset is not None
        and ds.dtype.kind in "fiub"
        and ds.dtype.byteorder in "=|<"
        and ds.id.get_storage_size() == ds.size * ds.dtype.itemsize
        and offset + ds.size * ds.dtype.itemsize <= size
    )
    return Region(name, int(offset) if contiguous else None, tuple(int(s) for s in ds.shape), ds.dtype.str)


def _non_overlapping(regions: list[Region]) -> list[Region]:
    """Regions in file order; one that overlaps the previous is read through h5py instead."""
    out: list[Region] = []
    end = 0
    for r in regions:
        if r.offset is not None and r.offset >= end:
            out.append(r)
            end = r.offset + r.nbytes
    return out


def _read_through_h5py(ds: h5py.Dataset, consumer: Consumer, piece_bytes: int) -> None:
    row = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    step = max(1, piece_bytes // row)
    for lo in range(0, ds.shape[0], step):
        hi = min(lo + step, ds.shape[0])
        consumer(lo, hi, ds[lo:hi])


def _stream(handle: ShardHandle, size: int, regions: list[Region], consumers: dict[str, Consumer], piece_bytes: int) -> tuple[str, int]:
    """Read the file front to back once; hash every byte; hand the regions' rows to their consumers."""
    cap = max([piece_bytes, *(r.row_bytes for r in regions)])
    bufs = [bytearray(cap), bytearray(cap)]
    pending: list = [None, None]
    h = hashlib.sha256()
    pos = 0
    turn = 0

    def read(n: int) -> memoryview | None:
        nonlocal pos, turn
        i = turn % 2
        turn += 1
        if pending[i] is not None:
            pending[i].result()  # the hash of what this buffer held two blocks ago is done
        view = memoryview(bufs[i])[:n]
        got = handle.readinto_at(pos, view)
        view = view[:got]
        pending[i] = pool.submit(h.update, view)
        pos += got
        return view if got == n else None

    with ThreadPoolExecutor(1, thread_name_prefix="shard-hash") as pool:
        for r in regions:
            while pos < r.offset:
                if read(min(cap, r.offset - pos)) is None:
                    break
            if pos != r.offset:
                break
            step = max(1, cap // max(r.row_bytes, 1))
            tail = r.shape[1:]
            for lo in range(0, r.shape[0], step):
                hi = min(lo + step, r.shape[0])
                view = read((hi - lo) * r.row_bytes)
                if view is None:
                    break
                rows = np.frombuffer(view, dtype=r.dtype).reshape(hi - lo, *tail)
                rows.flags.writeable = False
                consumers[r.name](lo, hi, rows)
        while True:
            view = read(cap)
            if view is None or not len(view):
                break
        for p in pending:
            if p is not None:
                p.result()
    return h.hexdigest(), pos
