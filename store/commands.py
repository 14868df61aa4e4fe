"""Text for the `store ls|verify|gc|push|pull` commands; the CLI prints what they return."""

from __future__ import annotations

import json
from typing import Any

from . import transfer
from .errors import plural as _plural
from .store import EntryInfo, Store, display_name, lookup

_MISSING_TEXT = "-"
_MISSING_FIELD = lookup({}, "x")


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_age(seconds: float | None) -> str:
    """3700 -> '1h'; None -> '-'."""
    if seconds is None:
        return _MISSING_TEXT
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _name(info: EntryInfo) -> str:
    return display_name(info.description) or (str(info.name) if info.name is not None else _MISSING_TEXT)


def _row(info: EntryInfo) -> dict[str, Any]:
    return {
        "name": _name(info),
        "kind": info.kind,
        "key": info.key,
        "rows": info.n_rows,
        "layers": info.description.get("n_layers"),
        "bytes": info.bytes,
        "created": info.created,
        "age_seconds": info.age_seconds,
        "complete": info.complete,
        "created_by": info.created_by,
    }


LS_FILTERS = {"dataset": "dataset.name", "split": "dataset.split", "model": "model.name", "kind": "kind"}


def _matches(info: EntryInfo, filters: dict[str, str | None]) -> bool:
    """Every given filter equals the entry's field; a heads entry's model is 'a+b', so any of its parts matches."""
    for name, want in filters.items():
        if want is None:
            continue
        have = lookup(info.description, LS_FILTERS[name])
        if name == "model" and isinstance(have, str) and want in have.split("+"):
            continue
        if have is _MISSING_FIELD or str(have) != want:
            return False
    return True


def ls(store: Store, as_json: bool = False, **filters: str | None) -> str:
    """A table (or JSON list) of the entries (filtered by dataset, split, model, kind) with their human
    name, kind, key, size and age, and a total line."""
    unknown = sorted(set(filters) - set(LS_FILTERS))
    if unknown:
        raise ValueError(f"ls filters {unknown}: expected some of {sorted(LS_FILTERS)}")
    rows = [_row(info) for info in store.list() if _matches(info, filters)]
    if as_json:
        return json.dumps(rows, indent=1, sort_keys=True)
    header = ["NAME", "KIND", "KEY", "ROWS", "LAYERS", "SIZE", "AGE", "COMPLETE", "CREATED_BY", "CODE"]
    lines = [header]
    for r in rows:
        by = r["created_by"]
        lines.append(
            [
                r["name"],
                r["kind"] or _MISSING_TEXT,
                r["key"][:12],
                _MISSING_TEXT if r["rows"] is None else str(r["rows"]),
                _MISSING_TEXT if r["layers"] is None else str(r["layers"]),
                human_bytes(r["bytes"]),
                human_age(r["age_seconds"]),
                "yes" if r["complete"] else "no",
                f"{by.get('user', '?')}@{by.get('host', '?')}" if by else _MISSING_TEXT,
                str(by.get("code_version") or _MISSING_TEXT) if by else _MISSING_TEXT,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
    if not rows:
        where = (
            " matching " + " ".join(f"--{k} {v}" for k, v in filters.items() if v is not None)
            if any(v is not None for v in filters.values())
            else ""
        )
        return text + f"\n(no entries{where} in {store.url})"
    complete = sum(r["complete"] for r in rows)
    total = f"total: {_plural(len(rows), 'entry')}, {human_bytes(sum(r['bytes'] for r in rows))}"
    return text + "\n" + total + ("" if complete == len(rows) else f" ({len(rows) - complete} incomplete)")


def verify(store: Store, keys: list[str] | None = None) -> tuple[str, int]:
    """(report, exit code): 0 if every file matches its manifest, 1 naming each bad file, 2 for a bad key."""
    keys = [store.resolve(k) for k in keys or ()]
    problems = store.verify(keys or None)
    # an entry whose manifest is unreadable lists as incomplete, but it was checked (and failed)
    checked = keys or sorted({i.key for i in store.list() if i.complete} | {p.key for p in problems})
    if not problems:
        return f"ok: {_plural(len(checked), 'entry')} verified in {store.url}", 0
    lines = [f"{p.path}: {p.reason}" for p in problems]
    bad = sorted({p.key for p in problems})
    lines.append(
        f"{_plural(len(problems), 'problem')} in {len(bad)} of {_plural(len(checked), 'entry')}; "
        "remove them (`store rm KEY`) and re-run the stages that built them"
    )
    return "\n".join(lines), 1


def gc(store: Store, grace_seconds: float = 86400, dry_run: bool = False) -> str:
    """Report of what gc removed (or would remove with dry_run)."""
    removed = store.gc(grace_seconds=grace_seconds, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    if not removed:
        return f"nothing to remove in {store.url} (grace {grace_seconds:g}s)"
    return "\n".join([*(f"{verb} {p}" for p in removed), f"{verb} {len(removed)} paths from {store.url}"])


def rm(store: Store, keys: list[str], force: bool = False) -> str:
    """Remove entries by key or unique prefix; one with a live lease is refused (StoreError) unless `force`."""
    infos = {i.key: i for i in store.list()}
    removed = store.rm(keys, force=force)
    lines = [
        f"removed {k[:12]} {_name(infos[k]) if k in infos else ''} ({human_bytes(infos[k].bytes) if k in infos else '?'})".replace(
            "  ", " "
        )
        for k in removed
    ]
    lines.append(f"removed {_plural(len(removed), 'entry')} from {store.url}")
    return "\n".join(lines)


def copy(src: Store, dst: Store, keys: list[str] | None = None) -> str:
    """Copy committed entries (default: all of `src`) to `dst`, every file verified by sha256 at the
    destination and the manifest published last; entries already committed in `dst` are skipped."""
    results = transfer.copy(src, dst, [src.resolve(k) for k in keys or ()] or None)
    if not results:
        return f"nothing to copy: no committed entries in {src.url}"
    lines = []
    for r in results:
        if r.status == "present":
            lines.append(f"skipped {r.key[:12]}: already committed in {dst.url}")
        else:
            how = "copied" if r.status == "copied" else "copied (committed meanwhile by another writer)"
            lines.append(f"{how} {r.key[:12]}: {r.files} files, {human_bytes(r.bytes)}")
    n = sum(r.status != "present" for r in results)
    lines.append(
        f"{n} copied, {len(results) - n} already present; {human_bytes(sum(r.bytes for r in results))} "
        f"from {src.url} to {dst.url}, verified by sha256"
    )
    return "\n".join(lines)
