"""Shard leases: one claim at a time, expired or dead claims taken over, heartbeats keep live ones."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from store import Store, fingerprint
from store.lease import Lease

DESC = {"kind": "features", "name": "lease-test", "n_layers": 1}
KEY = fingerprint(DESC)


def _lease_file(root, index):
    return root / "leases" / f"{KEY}.shard_{index:05d}.json"


def test_one_holder_at_a_time_and_release(tmp_path):
    store = Store(tmp_path)
    a, b = store.writer(KEY, DESC, n_shards=3), store.writer(KEY, DESC, n_shards=3)
    lease = a.shard_lease(1, ttl=60)
    assert lease is not None and _lease_file(tmp_path, 1).exists()
    assert b.shard_lease(1, ttl=60) is None  # held by a live writer
    other = b.shard_lease(2, ttl=60)  # unrelated shards are never blocked
    assert other is not None
    lease.release()
    other.release()
    assert not _lease_file(tmp_path, 1).exists() and not _lease_file(tmp_path, 2).exists()
    again = b.shard_lease(1, ttl=60)
    assert again is not None
    again.release()
    with pytest.raises(ValueError, match="out of range"):
        a.shard_lease(3)


def test_expired_lease_is_taken_over_and_loser_notices(tmp_path):
    store = Store(tmp_path)
    a, b = store.writer(KEY, DESC, n_shards=1), store.writer(KEY, DESC, n_shards=1)
    stale = a.shard_lease(0, ttl=0.05, heartbeat=False)
    time.sleep(0.1)
    fresh = b.shard_lease(0, ttl=60)
    assert fresh is not None
    assert json.loads(_lease_file(tmp_path, 0).read_text())["owner"] == fresh.owner
    with pytest.raises(Exception, match="lost the lease"):
        stale.refresh()
    stale.release()  # must not remove the new holder's lease
    assert _lease_file(tmp_path, 0).exists()
    fresh.release()


def test_heartbeat_keeps_a_short_lease_alive(tmp_path):
    store = Store(tmp_path)
    a, b = store.writer(KEY, DESC, n_shards=1), store.writer(KEY, DESC, n_shards=1)
    lease = a.shard_lease(0, ttl=0.3)  # refreshed every 0.1 s
    try:
        for _ in range(6):
            time.sleep(0.1)
            assert b.shard_lease(0, ttl=60) is None
    finally:
        lease.release()
    assert b.shard_lease(0, ttl=60) is not None


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    store = Store(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    (tmp_path / "leases").mkdir(parents=True, exist_ok=True)
    _lease_file(tmp_path, 0).write_text(json.dumps({"owner": "x", "host": socket.gethostname(), "pid": pid, "expires": time.time() + 3600}))
    w = store.writer(KEY, DESC, n_shards=1)
    lease = w.shard_lease(0, ttl=60)
    assert lease is not None
    lease.release()
    # the same lease held by a live process elsewhere (another host) is respected until it expires
    _lease_file(tmp_path, 0).write_text(json.dumps({"owner": "y", "host": "elsewhere", "pid": pid, "expires": time.time() + 3600}))
    assert w.shard_lease(0, ttl=60) is None
    assert Store(tmp_path).gc(grace_seconds=0) == []  # gc keeps the in-progress entry and its live lease


def test_threads_split_shards_exactly_once(tmp_path):
    """Eight workers (own Store objects, as separate processes would have) claim shards of one entry."""
    n_shards, computed, errors = 24, Counter(), []
    lock = threading.Lock()

    def worker():
        try:
            w = Store(tmp_path).writer(KEY, DESC, n_shards=n_shards)
            for k in range(n_shards):
                if k in w.done_shards():
                    continue
                lease = w.shard_lease(k, ttl=60)
                if lease is None:
                    continue
                with lease:
                    if k in w.done_shards():
                        continue
                    with lock:
                        computed[k] += 1
                    time.sleep(0.005)
                    import numpy as np
                    import pandas as pd

                    w.write_shard(
                        k, {"x": np.full((2, 3), k, dtype=np.float32)}, pd.DataFrame({"row": [2 * k, 2 * k + 1]}), row_start=2 * k
                    )
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(computed) == list(range(n_shards)) and set(computed.values()) == {1}
    store = Store(tmp_path)
    entry = store.writer(KEY, DESC, n_shards=n_shards).commit()
    assert entry.n_rows == 2 * n_shards and store.verify() == []
    assert os.listdir(tmp_path / "leases") == [] and os.listdir(tmp_path / "tmp") == []


def test_lease_file_names_are_checked(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(ValueError):
        Lease(store.fs, "not-a-key.shard_00001")
