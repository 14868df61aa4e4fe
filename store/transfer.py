"""Copy committed entries between stores (a local cache and a shared store), verified by hash.

Every file the source manifest lists is streamed to a temporary on the destination, hashed on the
way (a corrupt source is refused), published write-once, then re-read and hashed on the destination;
the source manifest's exact bytes are published last, so the copy is committed only when every file
is there and checked, and a pull of a push is byte-identical to the original.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from . import layout
from . import manifest as mf
from .errors import CorruptEntryError, StoreError
from .keys import validate_key
from .lease import WriterPresence

log = logging.getLogger(__name__)

_BLOCK = 1 << 22


@dataclass(frozen=True)
class CopyResult:
    key: str
    status: str  # "copied", "present" (already committed at the destination) or "raced" (committed meanwhile)
    files: int = 0
    bytes: int = 0


def _stream(src, src_path: str, dst, tmp: str) -> tuple[str, int]:
    """Copy one file in blocks, returning the sha256 and size of what was read."""
    h = hashlib.sha256()
    n = 0
    with src.fs.open(src_path, "rb") as fin, dst.fs.open(tmp, "wb") as fout:
        while block := fin.read(_BLOCK):
            h.update(block)
            fout.write(block)
            n += len(block)
    return h.hexdigest(), n


def copy_entry(src, dst, key: str) -> CopyResult:
    """Copy committed entry `key` from Store `src` to Store `dst` unless `dst` already has it committed."""
    validate_key(key)
    if dst.exists(key):
        return CopyResult(key, "present")
    s, d = src.fs, dst.fs
    try:
        manifest_bytes, manifest = mf.read(s, key)
    except FileNotFoundError:
        raise StoreError(f"no committed entry {key} in {src.url}; `store ls --store {src.url}` lists what is there") from None
    d.ensure_writable()
    for path in (d.join(layout.TMP), d.join(layout.LEASES)):
        d.makedirs(path)
    presence = WriterPresence(d, key).acquire()  # a `store gc` at the destination leaves the copy alone
    try:
        return _copy_files(src, dst, key, manifest, manifest_bytes)
    finally:
        presence.release()


def _copy_files(src, dst, key: str, manifest: dict, manifest_bytes: bytes) -> CopyResult:
    s, d = src.fs, dst.fs
    d.makedirs(layout.entry_dir(d, key))
    copied = total = 0
    for name, sha, size in mf.file_records(manifest):
        src_path, dst_path = layout.entry_file(s, key, name), layout.entry_file(d, key, name)
        if d.exists(dst_path):
            if d.sha256(dst_path) != (sha, size):
                raise CorruptEntryError(
                    f"{dst_path}: an unfinished copy of entry {key} in {dst.url} has different bytes than {src.url}; "
                    f"remove {layout.entry_dir(d, key)} (or run `store gc`) and copy again"
                )
            continue
        tmp = layout.tmp_path(d, key, name)
        try:
            got = _stream(s, src_path, d, tmp)
        except FileNotFoundError:
            d.remove(tmp)
            raise CorruptEntryError(
                f"{src_path}: missing in the source although its manifest lists it; run `store verify --store {src.url}`"
            ) from None
        if got != (sha, size):
            d.remove(tmp)
            raise CorruptEntryError(
                f"{src_path}: sha256/size do not match the manifest of entry {key} in {src.url}; "
                f"run `store verify --store {src.url}` and rebuild the entry there"
            )
        d.makedirs(layout.entry_dir(d, key))
        d.publish(tmp, dst_path)
        if d.sha256(dst_path) != (sha, size):
            raise CorruptEntryError(f"{dst_path}: copied file does not match its sha256 at the destination; remove it and copy again")
        copied += 1
        total += size
    tmp = layout.tmp_path(d, key, mf.MANIFEST_NAME)
    d.write_bytes(tmp, manifest_bytes)
    if not d.publish(tmp, layout.entry_file(d, key, mf.MANIFEST_NAME)):
        log.info("entry %s was committed in %s by another writer meanwhile", key, dst.url)
        return CopyResult(key, "raced", copied, total)
    log.info("copied entry %s (%d files, %d bytes) %s -> %s", key, copied, total, src.url, dst.url)
    return CopyResult(key, "copied", copied, total)


def copy(src, dst, keys: list[str] | None = None) -> list[CopyResult]:
    """Copy the given (default: every committed) entries of `src` to `dst`."""
    if not keys:
        keys = [i.key for i in src.list() if i.complete]
    return [copy_entry(src, dst, k) for k in keys]
