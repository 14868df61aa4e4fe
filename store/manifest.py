"""The manifest: the JSON file written last that makes an entry committed and lists every file's hash.

Parsing is strict: a manifest is data from a shared store, so every name in it must be a plain
file name inside its own entry directory, and its structure is checked before anything is opened.
"""

from __future__ import annotations

import json
from typing import Any

from . import layout
from .errors import CorruptEntryError
from .keys import parse_shard_name, validate_name

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

_SHARD_FIELDS = {
    "index": int,
    "file": str,
    "table": str,
    "row_start": int,
    "n_rows": int,
    "sha256": str,
    "bytes": int,
    "table_sha256": str,
    "table_bytes": int,
}
_FILE_FIELDS = {"name": str, "sha256": str, "bytes": int}


def dumps(manifest: dict[str, Any]) -> bytes:
    """Serialise a manifest (sorted keys, so the same content gives the same bytes)."""
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode("ascii")


def _escape(name: Any) -> bool:
    if not isinstance(name, str):
        return False
    try:
        validate_name(name)
    except ValueError:
        return True
    return False


def read(sfs, key: str) -> tuple[bytes, dict[str, Any]]:
    """The committed manifest of entry `key` as (exact bytes, parsed); FileNotFoundError if not committed."""
    path = layout.entry_file(sfs, key, MANIFEST_NAME)
    data = sfs.cat(path)
    return data, loads(data, key, path)


def loads(data: bytes, key: str, where: str) -> dict[str, Any]:
    """Parse and validate manifest bytes of entry `key`; CorruptEntryError (one line, naming `where`) if unsafe."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptEntryError(
            f"manifest invalid: {where} is not valid JSON ({exc}); re-run the stage that built entry {key} after removing it"
        ) from exc

    def bad(what: str) -> CorruptEntryError:
        return CorruptEntryError(f"manifest invalid: {where}: {what}; re-run the stage that built entry {key} after removing it")

    if not isinstance(manifest, dict):
        raise bad("top level is not an object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}")
    if manifest.get("key") != key:
        raise bad(f"key {manifest.get('key')!r} does not match directory {key}")
    if not isinstance(manifest.get("description"), dict):
        raise bad("description is not an object")
    shards, files = manifest.get("shards"), manifest.get("files")
    if not isinstance(shards, list) or not isinstance(files, list):
        raise bad("shards/files are not lists")
    for item in [*shards, *files]:
        for name in (item.get("file"), item.get("table"), item.get("name")) if isinstance(item, dict) else ():
            if _escape(name):
                raise CorruptEntryError(
                    f"path escapes store: {where} names {name!r}; remove entry {key} and re-run the stage that built it"
                )
    for i, shard in enumerate(shards):
        _check_fields(shard, _SHARD_FIELDS, bad, f"shards[{i}]")
        if shard["index"] != i or parse_shard_name(shard["file"]) != (i, "h5") or parse_shard_name(shard["table"]) != (i, "parquet"):
            raise bad(f"shards[{i}] is not shard {i} (files {shard['file']!r}, {shard['table']!r})")
    for i, item in enumerate(files):
        _check_fields(item, _FILE_FIELDS, bad, f"files[{i}]")
        if parse_shard_name(item["name"]) or item["name"] == MANIFEST_NAME:
            raise bad(f"files[{i}] reuses reserved name {item['name']!r}")
    if not isinstance(manifest.get("n_rows"), int):
        raise bad("n_rows is not an integer")
    return manifest


def _check_fields(item: Any, fields: dict[str, type], bad, where: str) -> None:
    if not isinstance(item, dict):
        raise bad(f"{where} is not an object")
    for field, typ in fields.items():
        value = item.get(field)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise bad(f"{where}.{field} is {value!r}, expected {typ.__name__}")


def file_records(manifest: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(name, sha256, bytes) of every file the manifest lists, shards first."""
    out = []
    for shard in manifest["shards"]:
        out.append((shard["file"], shard["sha256"], shard["bytes"]))
        out.append((shard["table"], shard["table_sha256"], shard["table_bytes"]))
    out.extend((f["name"], f["sha256"], f["bytes"]) for f in manifest["files"])
    return out
