"""gc removes stale temporaries, unfinished entries and expired leases, and never committed data."""

from __future__ import annotations

import os
import time

from store import Store, commands

DAY = 86400


def _age(path, seconds):
    """Set the mtime of `path` (and everything under it) `seconds` in the past."""
    old = time.time() - seconds
    for root, _, files in os.walk(path):
        for name in files:
            os.utime(os.path.join(root, name), (old, old))
    os.utime(path, (old, old))


def _stale_store(tmp_path, write_entry, description):
    store = Store(tmp_path / "fs")
    committed, _, _ = write_entry(store)
    unfinished, _, _ = write_entry(store, n_shards=4, description=description(max_length=64), commit=False)
    (tmp_path / "fs" / "tmp" / "crashed.part").write_bytes(b"half a shard")
    for path in (
        tmp_path / "fs" / "entries" / committed,
        tmp_path / "fs" / "entries" / unfinished,
        tmp_path / "fs" / "tmp" / "crashed.part",
    ):
        _age(path, 2 * DAY)
    return store, committed, unfinished


def test_gc_keeps_committed_and_removes_stale(tmp_path, write_entry, description):
    store, committed, unfinished = _stale_store(tmp_path, write_entry, description)
    removed = store.gc()
    assert sorted(os.path.basename(p) for p in removed) == sorted(["crashed.part", unfinished])
    assert store.exists(committed) and store.verify() == []
    assert not (tmp_path / "fs" / "entries" / unfinished).exists()
    assert not (tmp_path / "fs" / "tmp" / "crashed.part").exists()
    assert store.gc(grace_seconds=0) == []
    assert store.exists(committed) and store.verify() == []


def test_gc_grace_and_dry_run(tmp_path, write_entry, description):
    store, committed, unfinished = _stale_store(tmp_path, write_entry, description)
    assert store.gc(grace_seconds=3 * DAY) == []
    planned = store.gc(dry_run=True)
    assert len(planned) == 2 and (tmp_path / "fs" / "entries" / unfinished).exists()
    text = commands.gc(store, DAY, dry_run=True)
    assert "would remove 2 paths" in text and unfinished in text
    assert "removed 2 paths" in commands.gc(store, DAY, dry_run=False)
    assert "nothing to remove" in commands.gc(store, DAY, dry_run=False)


def test_fresh_unfinished_entry_is_kept(tmp_path, write_entry):
    store = Store(tmp_path / "fs")
    key, _, w = write_entry(store, commit=False)
    assert store.gc() == []
    assert store.gc(grace_seconds=0) == []  # its writer is still open: even a zero grace keeps it
    w.close()
    assert store.gc(grace_seconds=0)  # abandoned: an explicit zero grace removes it
    assert not (tmp_path / "fs" / "entries" / key).exists()


def test_live_lease_protects_and_expired_lease_is_removed(tmp_path, description, write_entry):
    store = Store(tmp_path / "fs")
    key, _, w = write_entry(store, commit=False)
    w.close()
    _age(tmp_path / "fs" / "entries" / key, 2 * DAY)
    with w.lease(ttl=60):
        assert store.gc() == []
    with w.lease(ttl=0.01):
        time.sleep(0.05)
        removed = store.gc()
        assert sorted(os.path.basename(p) for p in removed) == sorted([key, f"{key}.json"])
