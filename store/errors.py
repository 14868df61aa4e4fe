"""Errors raised by the store; each message is one line naming the key or file and what to do."""


class StoreError(Exception):
    """The store cannot do what was asked (missing entry, unwritable path, incomplete commit)."""


class CorruptEntryError(StoreError):
    """A committed entry's files do not match its manifest, or the manifest itself is unsafe."""


class InvalidKeyError(StoreError, ValueError):
    """A key or key prefix that is not lowercase hex of a usable length."""
