"""An s3:// store on a local S3-compatible server (moto, server mode), configured only by AWS_* variables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sharing_helpers import make_entry

from store import Store, fingerprint


def test_remote_hdf5_reads_fetch_byte_ranges_not_whole_files(s3_server, monkeypatch):
    s3fs = pytest.importorskip("s3fs")
    store = Store("s3://team-features/range-test")
    desc = {"kind": "features", "name": "ranges"}
    key = fingerprint(desc)
    w = store.writer(key, desc, n_shards=1)
    small = np.arange(40, dtype=np.float32).reshape(10, 4)
    big = np.random.default_rng(0).standard_normal((10, 200_000)).astype(np.float32)  # 8 MB the reader never needs
    w.write_shard(0, {"hidden/mean": small, "ffn/big": big}, pd.DataFrame({"row": np.arange(10)}), row_start=0)
    entry = w.commit()
    size = entry.manifest["shards"][0]["bytes"]

    fetched = []
    real = s3fs.core.S3File._fetch_range

    def counting(self, start, end):
        fetched.append(end - start)
        return real(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    np.testing.assert_array_equal(entry.array("hidden/mean").compute(scheduler="synchronous"), small)
    assert 0 < sum(fetched) < size / 2, (sum(fetched), size)


def test_concurrent_commits_on_s3_publish_one_manifest(s3_server):
    """Conditional create (If-None-Match) on the manifest: the first commit wins, the second adopts it."""
    a, b = Store("s3://team-features/commit-race"), Store("s3://team-features/commit-race")
    key = make_entry(a, "bert")
    manifest = a.open(key).manifest
    desc = manifest["description"]
    second = b.writer(key, desc, n_shards=2)
    assert second.done_shards() == {0, 1}
    assert second.commit().manifest == manifest
    lease = second.shard_lease(0, ttl=30)
    assert lease is not None and b.writer(key, desc, n_shards=2).shard_lease(0, ttl=30) is None
    lease.release()
    assert b.verify() == [] and b.gc(grace_seconds=0) == []
