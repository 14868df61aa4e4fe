"""The bench's score reference without hashing skips exactly the shard digest, and only inside its block."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.score_bench import make_store, run_score, shard_hash_skipped
from store import CorruptEntryError


def _flip_a_value_byte(url: str) -> None:
    shard = sorted(Path(url).rglob("*.h5"))[0]
    shard.chmod(0o644)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the float16 arrays: still a valid HDF5 file
    shard.write_bytes(bytes(data))


def test_skipped_hash_reads_a_changed_shard_and_is_restored_after(tmp_path):
    url, key, _ = make_store(tmp_path / "s", 1.0)
    run_score(url, key, 64)
    _flip_a_value_byte(url)
    with pytest.raises(CorruptEntryError, match="sha256 mismatch"):
        run_score(url, key, 64)
    with shard_hash_skipped():
        run_score(url, key, 64)
    with pytest.raises(CorruptEntryError, match="sha256 mismatch"):
        run_score(url, key, 64)
