"""Errors raised by the store; each message is one line naming the key or file and what to do."""


class StoreError(Exception):
    """The store cannot do what was asked (missing entry, unwritable path, incomplete commit)."""


class CorruptEntryError(StoreError):
    """A committed entry's files do not match its manifest, or the manifest itself is unsafe."""


class InvalidKeyError(StoreError, ValueError):
    """A key or key prefix that is not lowercase hex of a usable length."""


def plural(n: int, word: str) -> str:
    """'1 shard', '2 shards', '1 entry', '3 entries': counts in messages read as English."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") and word[-2:-1] not in "aeiou" else f"{n} {word}s"
