"""Where things live under a store root: entries/<key>/, tmp/ and leases/<key>[.shard_NNNNN].json."""

from __future__ import annotations

import uuid

from .fs import StoreFS
from .keys import validate_key

ENTRIES = "entries"
TMP = "tmp"
LEASES = "leases"


def entry_dir(sfs: StoreFS, key: str) -> str:
    return sfs.join(ENTRIES, validate_key(key))


def entry_file(sfs: StoreFS, key: str, name: str) -> str:
    return sfs.join(ENTRIES, validate_key(key), name)


def lease_path(sfs: StoreFS, key: str) -> str:
    return sfs.join(LEASES, f"{validate_key(key)}.json")


def lease_file(sfs: StoreFS, name: str) -> str:
    """Path of lease `name`: '<key>' (a whole entry) or '<key>.shard_00003' (one shard of it)."""
    validate_key(name.split(".", 1)[0])
    if "/" in name or name.endswith("."):
        raise ValueError(f"invalid lease name {name!r}")
    return sfs.join(LEASES, f"{name}.json")


def shard_lease_name(key: str, index: int) -> str:
    return f"{validate_key(key)}.shard_{index:05d}"


def writer_lease_name(key: str, owner: str) -> str:
    """Lease one writer holds while it works on an entry (unique per writer, never taken over)."""
    return f"{validate_key(key)}.writer_{owner}"


def gc_lock_name(key: str) -> str:
    """Lease `gc` and `rm` hold while they decide on and delete an unfinished entry."""
    return f"{validate_key(key)}.gc"


def lease_key(basename: str) -> str:
    """The entry key a lease file 'KEY[.shard_N].json' belongs to."""
    return basename.split(".", 1)[0]


def tmp_key(basename: str) -> str | None:
    """The entry key a temporary 'KEY.NAME.UUID.part' or 'lease.KEY[...].UUID.part' belongs to, if any."""
    parts = basename.split(".")
    candidate = parts[1] if parts[0] == "lease" and len(parts) > 1 else parts[0]
    try:
        return validate_key(candidate)
    except ValueError:
        return None


def tmp_path(sfs: StoreFS, key: str, name: str) -> str:
    """A fresh temporary path on the store's own filesystem, so publishing is a rename."""
    return sfs.join(TMP, f"{key}.{name}.{uuid.uuid4().hex}.part")
