"""Where things live under a store root: entries/<key>/, tmp/ and leases/<key>.json."""

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


def tmp_path(sfs: StoreFS, key: str, name: str) -> str:
    """A fresh temporary path on the store's own filesystem, so publishing is a rename."""
    return sfs.join(TMP, f"{key}.{name}.{uuid.uuid4().hex}.part")
