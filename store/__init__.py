"""A content-addressed, write-once store of HDF5 shards, Parquet row tables and artifact files.

It knows nothing about models: entries are keyed by the fingerprint of a description, written by
`Store.writer`, committed by a manifest published last, and read back lazily as Dask arrays.
"""

from .entry import Entry
from .errors import CorruptEntryError, StoreError
from .keys import fingerprint
from .store import EntryInfo, Problem, Store
from .writer import EntryWriter

__all__ = [
    "CorruptEntryError", "Entry", "EntryInfo", "EntryWriter", "Problem", "Store", "StoreError", "fingerprint",
]
