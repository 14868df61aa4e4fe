"""The one I/O layer of the store: every backend (local path, file://, s3://, memory://) goes through it.

Paths handed around are fsspec paths on one filesystem, so temporaries live on the same filesystem as
the published files and publishing is a rename (local) or a create-if-absent copy (object stores).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import StoreError

log = logging.getLogger(__name__)

_HASH_BLOCK = 1 << 20
RANDOM_ACCESS_BLOCK = 1 << 20
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


def _unlink_quietly(path: str) -> None:
    """Unlink a temporary that gc may already have removed."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class StoreFS:
    """A store root on one fsspec filesystem, with the few operations the store needs."""

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None):
        self.url = os.fspath(url)
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"StoreFS({self.url!r})"

    def join(self, *parts: str) -> str:
        """Path of `parts` under the root."""
        return "/".join([self.root.rstrip("/"), *parts]) if self.root != "/" else "/" + "/".join(parts)

    def rel(self, path: str) -> str:
        """`path` relative to the root (for messages)."""
        prefix = self.root.rstrip("/") + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path

    # reading -----------------------------------------------------------------------------------------

    def exists(self, path: str) -> bool:
        """Existence as the backend sees it now (listing caches dropped: other processes publish too)."""
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    def cat(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def open(self, path: str, mode: str = "rb") -> BinaryIO:
        return self.fs.open(path, mode)

    def size(self, path: str) -> int:
        return int(self.fs.info(path)["size"])

    def sha256(self, path: str) -> tuple[str, int]:
        """(sha256 hex, size in bytes) of a file, streamed in 1 MiB blocks."""
        h = hashlib.sha256()
        n = 0
        with self.fs.open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
                n += len(block)
        return h.hexdigest(), n

    def listdir(self, path: str) -> list[dict[str, Any]]:
        """Entries directly under `path` as fsspec detail dicts with 'basename'; [] if it does not exist."""
        self.fs.invalidate_cache(path)
        try:
            items = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for item in items:
            name = item["name"].rstrip("/")
            if name == path.rstrip("/"):
                continue
            item = dict(item)
            item["basename"] = name.rsplit("/", 1)[-1]
            out.append(item)
        return out

    def walk_files(self, path: str) -> Iterator[dict[str, Any]]:
        """Every file below `path` (detail dicts)."""
        for item in self.listdir(path):
            if item.get("type") == "directory":
                yield from self.walk_files(item["name"])
            else:
                yield item

    @staticmethod
    def mtime(info: dict[str, Any]) -> float | None:
        """Modification time (unix seconds) from an fsspec info dict, whatever the backend calls it."""
        for field in ("mtime", "LastModified", "last_modified", "created", "updated"):
            value = info.get(field)
            if value is None:
                continue
            if isinstance(value, _dt.datetime):
                return value.timestamp()
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
                except ValueError:
                    continue
        return None

    def local_path(self, path: str) -> str | None:
        """The OS path of `path` on a local filesystem, else None (open through `open` instead)."""
        return path if self.is_local else None

    # writing -----------------------------------------------------------------------------------------

    def ensure_writable(self) -> None:
        """Create the root if needed; a local root that exists but cannot be written raises StoreError."""
        try:
            self.fs.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"store path {self.url} is not writable ({exc.strerror or exc}); choose another store path or fix its permissions"
            ) from exc
        if self.is_local and not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"store path {self.url} is not writable; choose another store path or fix its permissions")

    @property
    def is_object_store(self) -> bool:
        """Flat key spaces (S3, GCS, Azure): no directories to create, a PUT is atomic."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        return any(p in _OBJECT_STORES for p in protocols)

    def makedirs(self, path: str) -> None:
        if self.is_object_store:
            return
        try:
            self.fs.makedirs(path, exist_ok=True)
        except PermissionError as exc:
            raise StoreError(f"cannot create {path} in store {self.url} ({exc.strerror}); fix its permissions") from exc

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file (used for temporaries only; published files go through `publish`).

        An OSError (disk full, quota, read-only filesystem) becomes a one-line StoreError naming the
        store, and the partial temporary is removed so it does not keep holding the space that ran out.
        """
        try:
            self.fs.pipe_file(path, data)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.fs.rm_file(path)
            raise StoreError(
                f"cannot write {self.rel(path)} in store {self.url} ({exc.strerror or exc}); free space or fix "
                "permissions and re-run: published shards are kept and the rerun resumes"
            ) from exc

    def publish_bytes(self, data: bytes, dst: str, tmp: str) -> bool:
        """Publish `data` at `dst` unless `dst` exists; True if this call published it.

        On an object store that supports conditional writes this is one create-if-absent PUT (atomic:
        readers see all of it or nothing); elsewhere `data` goes to temporary `tmp`, then `publish`.
        """
        if self.is_object_store:
            try:
                with self.fs.open(dst, "xb") as f:
                    f.write(data)
                return True
            except FileExistsError:
                return False
            except (ValueError, NotImplementedError, TypeError):
                pass  # no exclusive create on this backend: temporary + publish
        for attempt in range(3):
            self.write_bytes(tmp, data)
            try:
                return self.publish(tmp, dst)
            except FileNotFoundError:
                # `store gc` may remove a temporary of a writer that has not announced itself yet
                # (its own lease file); the bytes are still in memory, so write them again
                if attempt == 2:
                    raise
                log.debug("temporary %s vanished before it was published; writing it again", self.rel(tmp))
        raise AssertionError("unreachable")

    def publish(self, tmp: str, dst: str) -> bool:
        """Move temporary `tmp` to `dst` unless `dst` exists; True if this call published it.

        Local: the file is made read-only, then hard-linked into place (atomic, never overwrites) and
        the temporary unlinked. Object stores: create-if-absent where the backend supports it, else
        an existence check then a move; `dst` is never overwritten knowingly.
        """
        if self.is_local:
            os.chmod(tmp, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            try:
                os.link(tmp, dst)
            except FileExistsError:
                _unlink_quietly(tmp)
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                if os.path.exists(dst):
                    _unlink_quietly(tmp)
                    return False
                os.replace(tmp, dst)
                return True
            _unlink_quietly(tmp)
            return True
        if self.fs.exists(dst):
            self.fs.rm_file(tmp)
            return False
        data = self.fs.cat_file(tmp)
        try:
            with self.fs.open(dst, "xb") as f:
                f.write(data)
        except FileExistsError:
            self.fs.rm_file(tmp)
            return False
        except (ValueError, NotImplementedError, TypeError):
            self.fs.mv(tmp, dst)
            return True
        self.fs.rm_file(tmp)
        return True

    def overwrite(self, path: str, data: bytes, tmp: str) -> None:
        """Replace `path` with `data` atomically (rename over it locally; a single PUT on object stores)."""
        if self.is_local:
            self.fs.pipe_file(tmp, data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def open_random_access(self, path: str) -> BinaryIO:
        """A read handle for formats that seek (HDF5): remote files fetch small byte ranges on demand
        instead of a whole-file first block (s3fs's default block is 50 MiB)."""
        try:
            return self.fs.open(path, "rb", block_size=RANDOM_ACCESS_BLOCK, cache_type="readahead")
        except TypeError:
            return self.fs.open(path, "rb")

    def remove(self, path: str) -> None:
        """Remove a file or a directory tree (read-only published files included)."""
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile by someone else: the goal is met
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
            elif self.fs.exists(path):
                self.fs.rm_file(path)
