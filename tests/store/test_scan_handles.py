"""Kept shard handles belong to the run that keeps them: it closes them all, and a scan that
finishes after the run closed them closes its own."""

import hashlib

import pytest

from store.fs import StoreFS
from store.scan import KeptHandles, open_shard, read_rows, scan_shard


@pytest.fixture
def shard(tmp_path):
    import h5py
    import numpy as np

    path = tmp_path / "shard.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(24, dtype=np.float32).reshape(6, 4))
    data = path.read_bytes()
    return str(tmp_path), str(path), hashlib.sha256(data).hexdigest(), len(data)


def _scan(shard, keep):
    url, path, sha, size = shard
    rows = []
    _, regions = scan_shard(
        url, {}, path, sha256=sha, size=size, setup=lambda f: ({"x": lambda lo, hi, r: rows.append(r.copy())}, None), keep=keep
    )
    return regions, rows


def test_kept_handle_serves_the_second_pass_and_closes_with_the_run(shard):
    url, path, _, _ = shard
    with KeptHandles() as keep:
        regions, _ = _scan(shard, keep)
        handle = keep.get(path)
        assert handle is not None and not handle.fh.closed
        before = handle.bytes_read
        got = read_rows(url, {}, path, regions["x"], 2, 4, keep=keep)
        assert got.tolist() == [[8, 9, 10, 11], [12, 13, 14, 15]]
        assert handle.bytes_read == before + 2 * 4 * 4  # read through the kept handle
    assert handle.fh.closed and keep.get(path) is None


def test_a_scan_after_close_closes_its_own_handle(shard, monkeypatch):
    import store.scan as scan_mod

    opened = []
    monkeypatch.setattr(scan_mod, "open_shard", lambda sfs, p: opened.append(open_shard(sfs, p)) or opened[-1])
    keep = KeptHandles()
    keep.close()
    _scan(shard, keep)
    assert keep.get(shard[1]) is None and opened[0].fh.closed


def test_adopting_again_closes_the_handle_kept_before(shard):
    url, path, _, _ = shard
    keep = KeptHandles()
    first, second = open_shard(StoreFS(url, {}), path), open_shard(StoreFS(url, {}), path)
    assert keep.adopt(path, first) and keep.adopt(path, second)
    assert first.fh.closed and keep.get(path) is second
    keep.close()
    assert second.fh.closed and not keep.adopt(path, first)
