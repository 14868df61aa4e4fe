"""The same store code on fsspec's in-memory filesystem: the I/O layer is backend-agnostic."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pandas as pd
import pytest

from store import CorruptEntryError, Store, StoreError, commands, fingerprint
from store.fs import StoreFS


@pytest.fixture
def mem_store():
    url = f"memory://store-test-{uuid.uuid4().hex}"
    yield Store(url)
    fs = fsspec.filesystem("memory")
    root = fsspec.core.url_to_fs(url)[1]
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_round_trip(mem_store, write_entry):
    key, inputs, _ = write_entry(mem_store)
    entry = mem_store.open(key, verify=True)
    np.testing.assert_array_equal(entry.array("hidden/mean").compute(), np.concatenate([i[0]["hidden/mean"] for i in inputs]))
    np.testing.assert_array_equal(entry.read("hidden/first"), np.concatenate([i[0]["hidden/first"] for i in inputs]))
    np.testing.assert_array_equal(entry.per_shard("ffn/fire_count").compute()[2], inputs[2][0]["ffn/fire_count"])
    assert entry.shard_attrs("ffn/fire_count")[1]["n_tokens"] == 20
    pd.testing.assert_frame_equal(entry.table(), pd.concat([i[1] for i in inputs], ignore_index=True))
    assert [i.key for i in mem_store.list()] == [key]
    assert mem_store.find(**{"model.name": "bert"})[0].key == key
    assert commands.verify(mem_store, [])[1] == 0
    assert mem_store.gc(grace_seconds=0) == []


def test_memory_shards_match_local_bytes(mem_store, write_entry, tmp_path):
    key, _, _ = write_entry(mem_store)
    write_entry(Store(tmp_path / "fs"))
    fs = mem_store.fs
    for name in ("shard_00000.h5", "shard_00000.parquet"):
        assert fs.cat(fs.join("entries", key, name)) == (tmp_path / "fs" / "entries" / key / name).read_bytes()


def test_memory_crash_resume_and_corruption(mem_store, monkeypatch, make_shard, description):
    desc = description()
    key = fingerprint(desc)
    real_publish = StoreFS.publish

    def crash(self, tmp, dst):
        if dst.endswith("shard_00001.parquet"):
            raise OSError("simulated crash")
        return real_publish(self, tmp, dst)

    w = mem_store.writer(key, desc, n_shards=2)
    arrays, table, row_start, attrs = make_shard(0)
    w.write_shard(0, arrays, table, row_start=row_start, attrs=attrs)
    monkeypatch.setattr(StoreFS, "publish", crash)
    arrays, table, row_start, attrs = make_shard(1)
    with pytest.raises(OSError):
        w.write_shard(1, arrays, table, row_start=row_start, attrs=attrs)
    monkeypatch.setattr(StoreFS, "publish", real_publish)
    assert not mem_store.exists(key) and w.done_shards() == {0}
    with pytest.raises(StoreError):
        mem_store.open(key)
    w.write_shard(1, arrays, table, row_start=row_start, attrs=attrs)
    w.commit()

    fs = mem_store.fs
    path = fs.join("entries", key, "shard_00001.h5")
    data = bytearray(fs.cat(path))
    data[100] ^= 1
    fs.fs.pipe_file(path, bytes(data))
    assert [(p.path, p.reason) for p in mem_store.verify()] == [(path, "sha256 mismatch")]
    with pytest.raises(CorruptEntryError, match="sha256 mismatch"):
        mem_store.open(key, verify=True)
    removed = mem_store.gc(grace_seconds=0)
    assert all("/tmp/" in p for p in removed) and mem_store.exists(key)
