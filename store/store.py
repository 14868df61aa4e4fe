"""Store: the entry point to a content-addressed, write-once feature store at a path or fsspec URL."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import h5py
import pyarrow.parquet as pq

from . import layout
from . import manifest as mf
from .entry import Entry
from .errors import CorruptEntryError, InvalidKeyError, StoreError
from .fs import StoreFS
from .keys import validate_key
from .lease import GC_LOCK_TTL, Lease, live_leases
from .writer import EntryWriter

log = logging.getLogger(__name__)

_MISSING = object()
MIN_PREFIX = 8
_FULL_KEY = re.compile(r"[0-9a-f]{64}")
_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},64}}")


@dataclass(frozen=True)
class EntryInfo:
    """One line of `Store.list()`: a committed or incomplete entry."""

    key: str
    kind: str | None
    name: str | None
    complete: bool
    n_rows: int | None
    bytes: int
    created: float | None
    age_seconds: float | None
    description: dict[str, Any] = field(default_factory=dict)
    created_by: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Problem:
    """One failed check of `Store.verify()`: which entry, which file, and why."""

    key: str
    path: str
    reason: str

    def error(self) -> StoreError:
        """What a reader raises for it: CorruptEntryError, or StoreError for an uncommitted entry."""
        cls = StoreError if self.reason == "not committed" else CorruptEntryError
        return cls(f"{self.path}: {self.reason}; remove entry {self.key} and re-run the stage that built it")


def lookup(description: dict[str, Any], dotted: str) -> Any:
    """Value at a dotted path like 'dataset.name' in a nested description, or a sentinel if absent."""
    value: Any = description
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def display_name(description: dict[str, Any]) -> str | None:
    """'dataset/split/model' from a description, else its 'name', else None."""
    parts = [lookup(description, f) for f in ("dataset.name", "dataset.split", "model.name")]
    parts = [str(p) for p in parts if isinstance(p, (str, int, float))]
    if parts:
        return "/".join(parts)
    name = description.get("name")
    return None if name is None else str(name)


class Store:
    """A feature store rooted at a local path or fsspec URL ('s3://bucket/prefix', 'memory://x')."""

    def __init__(self, url: str | os.PathLike, storage_options: dict | None = None, *, code_version: str = "unknown"):
        self._sfs = StoreFS(url, storage_options)
        self.url = self._sfs.url
        self.code_version = code_version

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @property
    def fs(self) -> StoreFS:
        return self._sfs

    def exists(self, key: str) -> bool:
        """True if entry `key` is committed (its manifest is published)."""
        return self._sfs.exists(layout.entry_file(self._sfs, key, mf.MANIFEST_NAME))

    def resolve(self, key: str) -> str:
        """The full key of entry `key`, or of the one entry whose key starts with it (8+ hex characters),
        like git; StoreError naming the matches if several do, or saying none does."""
        if isinstance(key, str) and _FULL_KEY.fullmatch(key):
            return key
        if not isinstance(key, str) or not _PREFIX.fullmatch(key):
            raise InvalidKeyError(f"invalid store key {key!r}: expected a key or a unique prefix of {MIN_PREFIX}+ lowercase hex characters")
        matches = [k for k in self._keys() if k.startswith(key)]
        if key in matches:
            return key
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise StoreError(f"no entry {key} in {self.url}; `store ls` lists the entries")
        names = {i.key: display_name(i.description) for i in self.list() if i.key in matches}
        listed = ", ".join(f"{k[:16]} ({names.get(k) or '?'})" for k in matches)
        raise StoreError(f"key prefix {key} is ambiguous in {self.url}: {len(matches)} entries match: {listed}; give more characters")

    def open(self, key: str, verify: bool = False) -> Entry:
        """The committed entry `key` (or a unique key prefix); with verify=True every file is rehashed first."""
        key = self.resolve(key)
        if verify:
            problems = self.verify([key])
            if problems:
                raise problems[0].error()
        return Entry(self._sfs, key)

    def writer(
        self, key: str, description: dict, *, n_shards: int, code_version: str | None = None, compression: str | None = None
    ) -> EntryWriter:
        """A writer for entry `key` (creates the store root on first use); code_version defaults to the store's."""
        return EntryWriter(
            self._sfs, key, description, n_shards=n_shards, code_version=code_version or self.code_version, compression=compression
        )

    # listing -----------------------------------------------------------------------------------------

    def _keys(self) -> list[str]:
        keys = []
        for item in self._sfs.listdir(self._sfs.join(layout.ENTRIES)):
            try:
                keys.append(validate_key(item["basename"]))
            except ValueError:
                log.warning("ignoring %s in store %s: not an entry key", item["name"], self.url)
        return sorted(keys)

    def list(self) -> list[EntryInfo]:
        """Committed and incomplete entries, newest first."""
        now = time.time()
        infos = []
        for key in self._keys():
            files = list(self._sfs.walk_files(layout.entry_dir(self._sfs, key)))
            size = sum(int(f.get("size") or 0) for f in files)
            manifest = None
            if any(f["name"].endswith("/" + mf.MANIFEST_NAME) for f in files):
                try:
                    manifest = Entry(self._sfs, key).manifest
                except CorruptEntryError as exc:
                    log.warning("%s", exc)
            if manifest is not None:
                description, created = manifest["description"], float(manifest.get("created") or 0)
                n_rows, created_by = manifest["n_rows"], manifest.get("created_by") or {}
            else:
                description, n_rows, created_by = self._incomplete_description(files), None, {}
                times = [t for t in (StoreFS.mtime(f) for f in files) if t is not None]
                created = max(times) if times else None
            infos.append(
                EntryInfo(
                    key=key,
                    kind=description.get("kind"),
                    name=description.get("name"),
                    complete=manifest is not None,
                    n_rows=n_rows,
                    bytes=size,
                    created=created,
                    age_seconds=None if created is None else max(0.0, now - created),
                    description=description,
                    created_by=created_by,
                )
            )
        return sorted(infos, key=lambda i: -(i.created or 0))

    def _incomplete_description(self, files: list[dict[str, Any]]) -> dict[str, Any]:
        """Description of an uncommitted entry, read from the metadata of its first Parquet shard."""
        for f in sorted(files, key=lambda f: f["name"]):
            if f["name"].endswith(".parquet"):
                try:
                    with self._sfs.open(f["name"], "rb") as fh:
                        meta = pq.read_schema(fh).metadata or {}
                    return json.loads(meta[b"store.description"])
                except (KeyError, OSError, ValueError) as exc:
                    log.debug("no description in %s: %s", f["name"], exc)
        return {}

    def find(self, **match: Any) -> list[Entry]:
        """Committed entries whose description has every given (dotted) field equal to the given value."""
        found = []
        for key in self._keys():
            if not self.exists(key):
                continue
            try:
                entry = Entry(self._sfs, key)
            except CorruptEntryError as exc:
                log.warning("%s", exc)
                continue
            if all(lookup(entry.description, k) == v for k, v in match.items()):
                found.append(entry)
        return found

    # integrity ---------------------------------------------------------------------------------------

    def verify(self, keys: list[str] | None = None) -> list[Problem]:
        """Rehash every file of the given (default: all committed) entries against their manifests.

        ``keys`` are full keys or unique prefixes, as for :meth:`open`. Files are hashed on a thread
        per core (hashlib and file reads release the GIL), the problems reported in entry and file
        order whatever finishes first.
        """
        keys = [k for k in self._keys() if self.exists(k)] if keys is None else [self.resolve(k) for k in keys]
        problems: list[Problem] = []
        manifests: list[tuple[str, str, dict[str, Any]]] = []
        for key in keys:
            mpath = layout.entry_file(self._sfs, key, mf.MANIFEST_NAME)
            try:
                _, manifest = mf.read(self._sfs, key)
            except FileNotFoundError:
                problems.append(Problem(key, mpath, "not committed"))
                continue
            except CorruptEntryError as exc:
                reason = "path escapes store" if str(exc).startswith("path escapes store") else "manifest invalid"
                problems.append(Problem(key, mpath, reason))
                continue
            manifests.append((key, mpath, manifest))
        files = [
            (key, layout.entry_file(self._sfs, key, name), sha, size) for key, _, m in manifests for name, sha, size in mf.file_records(m)
        ]
        with ThreadPoolExecutor(max(1, min(len(files), os.cpu_count() or 1)), thread_name_prefix="store-verify") as pool:
            reasons = list(pool.map(lambda f: self._file_problem(*f[1:]), files))
        for key, mpath, manifest in manifests:
            found = [Problem(k, path, r) for (k, path, _, _), r in zip(files, reasons) if k == key and r is not None]
            # the files are the ones committed: check the counts
            problems.extend(found or self._row_problems(key, mpath, manifest))
        order = {k: i for i, k in enumerate(keys)}
        problems.sort(key=lambda p: order[p.key])  # stable: each entry's problems stay in file order
        for p in problems:
            log.warning("verify: %s: %s", p.path, p.reason)
        return problems

    def _file_problem(self, path: str, sha: str, size: int) -> str | None:
        """Why one file differs from its manifest record, or None."""
        try:
            actual_size = self._sfs.size(path)
            if actual_size != size:
                return "size mismatch (truncated?)" if actual_size < size else "size mismatch"
            if self._sfs.sha256(path)[0] != sha:
                return "sha256 mismatch"
        except FileNotFoundError:
            return "missing"
        return None

    def _row_problems(self, key: str, mpath: str, manifest: dict[str, Any]) -> list[Problem]:
        """Row counts of the manifest against its shards: the manifest total, each shard's `n_rows` and
        `row_start` (continuous from 0), the HDF5 file attributes, the Parquet row count and the first
        axis of every row-wise dataset must agree. Hashes cannot catch an edited manifest; this can."""
        from .entry import open_h5

        out: list[Problem] = []
        shards = manifest["shards"]
        if shards:
            total = sum(s["n_rows"] for s in shards)
            if manifest["n_rows"] != total:
                out.append(Problem(key, mpath, f"row count mismatch: n_rows {manifest['n_rows']} but the shards hold {total}"))
        start = 0
        shapes: list[dict[str, tuple[int, ...]]] = []
        for s in shards:
            h5_path = layout.entry_file(self._sfs, key, s["file"])
            if s["row_start"] != start:
                out.append(Problem(key, mpath, f"row count mismatch: shard {s['index']} row_start {s['row_start']}, expected {start}"))
            start = s["row_start"] + s["n_rows"]
            found: dict[str, tuple[int, ...]] = {}
            with open_h5(self._sfs, h5_path) as f:
                for k in ("row_start", "n_rows"):
                    if k in f.attrs and int(f.attrs[k]) != s[k]:
                        out.append(Problem(key, h5_path, f"row count mismatch: the file says {k} {int(f.attrs[k])}, the manifest {s[k]}"))
                f.visititems(lambda name, obj, found=found: found.__setitem__(name, obj.shape) if isinstance(obj, h5py.Dataset) else None)
            shapes.append(found)
            table_path = layout.entry_file(self._sfs, key, s["table"])
            with self._sfs.open(table_path, "rb") as fh:
                table_rows = pq.read_metadata(fh).num_rows
            if table_rows != s["n_rows"]:
                out.append(Problem(key, table_path, f"row count mismatch: {table_rows} rows, the manifest says {s['n_rows']}"))
        # a dataset is row-wise if its first axis follows the shard's rows somewhere and its shape varies;
        # per-shard datasets (firing counts) have one shape in every shard
        for name in sorted({n for found in shapes for n in found}):
            dims = [found.get(name) for found in shapes]
            if len(set(dims)) > 1 and any(d and d[0] == s["n_rows"] for d, s in zip(dims, shards)):
                for d, s in zip(dims, shards):
                    if d is not None and (not d or d[0] != s["n_rows"]):
                        out.append(
                            Problem(
                                key,
                                layout.entry_file(self._sfs, key, s["file"]),
                                f"row count mismatch: dataset {name} has {d[0] if d else 0} rows, expected {s['n_rows']}",
                            )
                        )
        return out

    # garbage collection ----------------------------------------------------------------------------

    def _leases(self) -> dict[str, list[tuple[str, bool]]]:
        """key -> [(lease path, live)] for every lease of the key; unreadable ones are not live."""
        out: dict[str, list[tuple[str, bool]]] = {}
        now = time.time()
        for item in self._sfs.listdir(self._sfs.join(layout.LEASES)):
            base = item["basename"]
            if not base.endswith(".json"):
                continue
            out.setdefault(layout.lease_key(base), []).append((item["name"], self._lease_live(item["name"], now)))
        return out

    def _lease_live(self, path: str, now: float | None = None) -> bool:
        try:
            body = json.loads(self._sfs.cat(path))
        except (ValueError, AttributeError, TypeError, FileNotFoundError):
            return False
        return isinstance(body, dict) and Lease.is_live(body, now)

    def _remove_entry(self, key: str, *, force: bool = False, committed: bool = False) -> bool:
        """Delete entry `key` under its gc lock unless a writer holds a live lease on it (or, without
        `committed`, it is committed); False if it was kept. See `WriterPresence` for why this is safe."""
        lock = Lease(self._sfs, layout.gc_lock_name(key), GC_LOCK_TTL, what=f"gc of entry {key}")
        if not lock.try_acquire():
            log.info("entry %s: another gc or rm is working on it; skipped", key)
            return False
        try:
            if not force and live_leases(self._sfs, key, exclude=(lock.path,)):
                return False
            if not committed and self.exists(key):
                return False
            # the manifest goes first: the entry stops existing at once, never half-deleted but committed
            self._sfs.remove(layout.entry_file(self._sfs, key, mf.MANIFEST_NAME))
            self._sfs.remove(layout.entry_dir(self._sfs, key))
            return True
        finally:
            lock.release()

    def gc(self, grace_seconds: float = 86400, dry_run: bool = False) -> list[str]:
        """Remove temporaries and unfinished entries older than `grace_seconds`, and expired leases.

        A committed entry (manifest present) is never touched; an unfinished entry, or a temporary of
        it, is kept whatever its age while any lease on it is live, and the final decision for an entry
        is taken under its gc lock (safe against writers starting meanwhile). Temporaries are listed
        before the leases: a temporary written under a lease is then never seen without that lease.
        Returns the removed (or, with dry_run, removable) paths.
        """
        now = time.time()
        tmp_items = list(self._sfs.walk_files(self._sfs.join(layout.TMP)))
        leases = self._leases()

        def busy(key: str | None) -> bool:
            return key is not None and any(live for _, live in leases.get(key, ()))

        tmp_doomed: list[str] = []
        for item in tmp_items:
            mtime = StoreFS.mtime(item)
            if (mtime is None or now - mtime > grace_seconds) and not busy(layout.tmp_key(item["basename"])):
                tmp_doomed.append(item["name"])
        entries: list[str] = []
        for key in self._keys():
            if self.exists(key) or busy(key):
                continue
            times = [StoreFS.mtime(f) for f in self._sfs.walk_files(layout.entry_dir(self._sfs, key))]
            known = [t for t in times if t is not None]
            if not known or now - max(known) > grace_seconds:
                entries.append(key)
        dead = [path for key, held in sorted(leases.items()) for path, live in sorted(held) if not live]
        if dry_run:
            return tmp_doomed + [layout.entry_dir(self._sfs, k) for k in entries] + dead
        removed: list[str] = []
        for path in tmp_doomed:
            self._sfs.remove(path)
            removed.append(path)
        for key in entries:
            if self._remove_entry(key):
                removed.append(layout.entry_dir(self._sfs, key))
        for path in dead:
            if not self._lease_live(path):  # re-read: it may have been taken over since the listing
                self._sfs.remove(path)
                removed.append(path)
        for path in removed:
            log.info("gc removed %s", path)
        return removed

    def rm(self, keys: list[str], *, force: bool = False) -> list[str]:
        """Delete the given entries (committed or not); one with a live lease is refused unless `force`.

        Raises StoreError naming every refused key after removing the others; returns the removed keys.
        """
        removed, busy = [], []
        keys = list(dict.fromkeys(self.resolve(k) for k in keys))
        for key in keys:
            if not self._sfs.exists(layout.entry_dir(self._sfs, key)):
                raise StoreError(f"no entry {key} in {self.url}; `store ls` lists the entries")
        for key in keys:
            (removed if self._remove_entry(key, force=force, committed=True) else busy).append(key)
        if busy:
            raise StoreError(
                f"entry {', '.join(k[:12] for k in busy)} is being written (live lease); wait for the writer to finish, or pass --force"
            )
        return removed
