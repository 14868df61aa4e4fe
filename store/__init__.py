"""A content-addressed, write-once store of HDF5 shards, Parquet row tables and artifact files.

It knows nothing about models: entries are keyed by the fingerprint of a description, written by
`Store.writer`, committed by a manifest published last, and read back lazily as Dask arrays.
"""

import importlib
from typing import TYPE_CHECKING

from .errors import CorruptEntryError, StoreError
from .keys import fingerprint

if TYPE_CHECKING:
    from .entry import Entry
    from .store import EntryInfo, Problem, Store
    from .writer import EntryWriter

# Imported on first use, so a Dask worker that only reads shards (store.entry) does not
# pay for pandas and pyarrow, which the writer and the listing need.
_LAZY = {"Entry": "entry", "EntryInfo": "store", "Problem": "store", "Store": "store", "EntryWriter": "writer"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CorruptEntryError",
    "Entry",
    "EntryInfo",
    "EntryWriter",
    "Problem",
    "Store",
    "StoreError",
    "fingerprint",
]
