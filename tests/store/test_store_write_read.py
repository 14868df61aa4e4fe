"""Writing, committing, resuming after a crash and reading entries back on a local store."""

from __future__ import annotations

import os
import stat
import time

import dask
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from store import CorruptEntryError, Entry, Store, StoreError, fingerprint
from store.fs import StoreFS


def test_round_trip(tmp_path, write_entry):
    store = Store(tmp_path / "fs")
    key, inputs, entry = write_entry(store)
    assert isinstance(entry, Entry) and store.exists(key)
    entry = store.open(key, verify=True)
    assert entry.n_shards == 3 and entry.n_rows == 15
    mean = entry.array("hidden/mean")
    assert mean.chunks[0] == (5, 5, 5)
    np.testing.assert_array_equal(mean.compute(), np.concatenate([i[0]["hidden/mean"] for i in inputs]))
    fire = entry.per_shard("ffn/fire_count")
    assert fire.shape == (3, 3, 6)
    np.testing.assert_array_equal(fire.compute(), np.stack([i[0]["ffn/fire_count"] for i in inputs]))
    assert [a["n_tokens"] for a in entry.shard_attrs("ffn/fire_count")] == [10, 20, 30]
    assert entry.datasets()["hidden/mean"] == ((3, 4), np.dtype("float32"))
    pd.testing.assert_frame_equal(entry.table(), pd.concat([i[1] for i in inputs], ignore_index=True))
    assert entry.description == store.open(key).description
    assert entry.manifest["created_by"]["code_version"] == "unknown"


def test_rows_per_chunk_splits_shards(tmp_path, write_entry):
    store = Store(tmp_path / "fs")
    key, inputs, entry = write_entry(store)
    arr = entry.array("hidden/first", rows_per_chunk=2)
    assert arr.chunks[0] == (2, 2, 1) * 3
    np.testing.assert_array_equal(arr.compute(), np.concatenate([i[0]["hidden/first"] for i in inputs]))


def test_read_returns_what_the_lazy_array_computes(tmp_path, write_entry):
    store = Store(tmp_path / "fs")
    key, inputs, _ = write_entry(store)
    entry = store.open(key)
    for name in ("hidden/mean", "hidden/first"):
        got = entry.read(name)
        np.testing.assert_array_equal(got, np.concatenate([i[0][name] for i in inputs]))
        assert got.dtype == entry.array(name).dtype and got.flags.c_contiguous and got.flags.writeable
    for lazy_or_not in (entry.read, entry.array):  # one row per threshold in each shard, not one per text
        with pytest.raises(
            ValueError,
            match=r"'ffn/fire_count' .* is not one row per text \(shard 0 holds \(3, 6\) for its 5 rows\): a per-shard dataset \(use per_shard\)",
        ):
            lazy_or_not("ffn/fire_count")
    with pytest.raises(KeyError, match="no dataset 'hidden/last'"):
        entry.read("hidden/last")


def test_read_refuses_a_shard_whose_rows_disagree_with_shard_0(tmp_path, write_entry, make_shard, description):
    store = Store(tmp_path / "fs")
    desc = description()
    w = store.writer(fingerprint(desc), desc, n_shards=2)
    for i in range(2):
        arrays, table, row_start, attrs = make_shard(i, width=4 + i)
        w.write_shard(i, arrays, table, row_start=row_start, attrs=attrs)
    entry = w.commit()
    with pytest.raises(
        CorruptEntryError, match=r"shard_00001.h5: dataset 'hidden/mean' has shape \(5, 3, 5\), shard 0 has rows of shape \(3, 4\)"
    ):
        entry.read("hidden/mean")


def test_files_carry_key_and_description(tmp_path, write_entry):
    import json

    import h5py

    store = Store(tmp_path / "fs")
    key, _, _ = write_entry(store)
    d = tmp_path / "fs" / "entries" / key
    with h5py.File(d / "shard_00001.h5", "r") as f:
        assert f.attrs["key"] == key and f.attrs["row_start"] == 5 and f.attrs["n_rows"] == 5
        assert json.loads(f.attrs["description"])["model"]["name"] == "bert"
    meta = pq.read_schema(d / "shard_00001.parquet").metadata
    assert meta[b"store.key"].decode() == key


def test_open_uncommitted_raises(tmp_path, write_entry):
    store = Store(tmp_path / "fs")
    key, _, _ = write_entry(store, commit=False)
    assert not store.exists(key)
    with pytest.raises(StoreError, match=f"no committed entry {key}"):
        store.open(key)
    with pytest.raises(ValueError, match="invalid store key"):
        store.open("../etc")


def test_published_files_are_read_only(tmp_path, write_entry):
    store = Store(tmp_path / "fs")
    key, _, _ = write_entry(store)
    for path in (tmp_path / "fs" / "entries" / key).iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0, path


def test_byte_identical_shards(tmp_path, write_entry):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    key, _, _ = write_entry(a)
    time.sleep(1.1)  # HDF5 object timestamps have one-second resolution
    write_entry(b)
    for name in sorted(os.listdir(tmp_path / "a" / "entries" / key)):
        if name != "manifest.json":
            assert (tmp_path / "a" / "entries" / key / name).read_bytes() == (tmp_path / "b" / "entries" / key / name).read_bytes(), name
    ma, mb = a.open(key).manifest, b.open(key).manifest
    assert ma["shards"] == mb["shards"]


def test_crash_between_write_and_publish_then_resume(tmp_path, monkeypatch, make_shard, description):
    store, reference = Store(tmp_path / "fs"), Store(tmp_path / "ref")
    desc = description()
    key = fingerprint(desc)
    real_publish = StoreFS.publish

    def crash_on_shard_1(self, tmp, dst):
        if dst.endswith("shard_00001.h5"):
            raise OSError("simulated crash before publish")
        return real_publish(self, tmp, dst)

    w = store.writer(key, desc, n_shards=3)
    w.write_shard(0, *make_shard(0)[:2], row_start=0, attrs=make_shard(0)[3])
    monkeypatch.setattr(StoreFS, "publish", crash_on_shard_1)
    arrays, table, row_start, attrs = make_shard(1)
    with pytest.raises(OSError, match="simulated crash"):
        w.write_shard(1, arrays, table, row_start=row_start, attrs=attrs)
    monkeypatch.setattr(StoreFS, "publish", real_publish)

    assert not store.exists(key)
    assert w.done_shards() == {0}
    assert not (tmp_path / "fs" / "entries" / key / "shard_00001.h5").exists()
    with pytest.raises(StoreError, match="no committed entry"):
        store.open(key)
    with pytest.raises(StoreError, match=r"shards \[1, 2\] are not written"):
        w.commit()

    resumed = Store(tmp_path / "fs").writer(key, desc, n_shards=3)
    assert resumed.done_shards() == {0}
    for i in range(3):
        if i not in resumed.done_shards():
            arrays, table, row_start, attrs = make_shard(i)
            resumed.write_shard(i, arrays, table, row_start=row_start, attrs=attrs)
    entry = resumed.commit()
    assert entry.n_rows == 15 and store.verify() == []

    ref = reference.writer(key, desc, n_shards=3)
    for i in range(3):
        arrays, table, row_start, attrs = make_shard(i)
        ref.write_shard(i, arrays, table, row_start=row_start, attrs=attrs)
    assert ref.commit().manifest["shards"] == entry.manifest["shards"]


def test_commit_is_write_once(tmp_path, write_entry):
    store = Store(tmp_path / "fs")
    key, _, entry = write_entry(store)
    manifest = (tmp_path / "fs" / "entries" / key / "manifest.json").read_bytes()
    again = store.writer(key, entry.description, n_shards=3).commit()
    assert again.manifest == entry.manifest
    assert (tmp_path / "fs" / "entries" / key / "manifest.json").read_bytes() == manifest


def test_commit_checks_row_ranges(tmp_path, make_shard, description):
    store = Store(tmp_path / "fs")
    desc = description()
    w = store.writer(fingerprint(desc), desc, n_shards=2)
    for i in range(2):
        arrays, table, _, attrs = make_shard(i)
        w.write_shard(i, arrays, table, row_start=0, attrs=attrs)
    with pytest.raises(StoreError, match="shard 1 starts at row 0, expected 5"):
        w.commit()


def test_write_shard_validates_arguments(tmp_path, make_shard, description):
    store = Store(tmp_path / "fs")
    desc = description()
    w = store.writer(fingerprint(desc), desc, n_shards=2)
    arrays, table, _, attrs = make_shard(0)
    with pytest.raises(ValueError, match="shard index 2 out of range"):
        w.write_shard(2, arrays, table, row_start=0)
    with pytest.raises(ValueError, match="invalid dataset name"):
        w.write_shard(0, {"../x": arrays["hidden/mean"]}, table, row_start=0)
    with pytest.raises(ValueError, match="attrs .* name datasets not written"):
        w.write_shard(0, arrays, table, row_start=0, attrs={"nope": {}})
    with pytest.raises(TypeError, match="description .* must be a dict"):
        store.writer(fingerprint(desc), ["not", "a", "dict"], n_shards=1)


def test_artifact_files(tmp_path, description):
    store = Store(tmp_path / "fs")
    desc = description(kind="head")
    key = fingerprint(desc)
    w = store.writer(key, desc, n_shards=0)
    table = pd.DataFrame({"layer": [0, 1], "nu": [1.5, 0.9]})
    buf = __import__("io").BytesIO()
    table.to_parquet(buf, index=False)
    w.write_file("table.parquet", buf.getvalue())
    w.write_file("head.json", b'{"layer": 1}')
    w.write_file("head.json", b'{"layer": 1}')
    with pytest.raises(StoreError, match="already has head.json with different content"):
        w.write_file("head.json", b'{"layer": 2}')
    for bad in ("../x", "a/b", "/abs", ".."):
        with pytest.raises(ValueError, match="invalid entry file name"):
            w.write_file(bad, b"x")
    with pytest.raises(ValueError, match="reserved"):
        w.write_file("manifest.json", b"{}")
    entry = w.commit()
    assert entry.files == ["head.json", "table.parquet"] and entry.n_rows == 2 and entry.n_shards == 0
    assert entry.read_file("head.json") == b'{"layer": 1}'
    pd.testing.assert_frame_equal(entry.table(), table)
    with pytest.raises(KeyError, match="no file"):
        entry.read_file("other.bin")


def test_unwritable_store_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=f"store path {blocker}/fs is not writable"):
        Store(blocker / "fs").writer("a" * 64, {}, n_shards=1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_store_path(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    with pytest.raises(StoreError, match=f"store path {root} is not writable"):
        Store(root).writer("a" * 64, {}, n_shards=1)


def test_lease(tmp_path, description):
    store = Store(tmp_path / "fs")
    desc = description()
    key = fingerprint(desc)
    first, second = store.writer(key, desc, n_shards=1), store.writer(key, desc, n_shards=1)
    with first.lease(ttl=60):
        assert (tmp_path / "fs" / "leases" / f"{key}.json").exists()
        first.refresh_lease()
        with pytest.raises(StoreError, match=f"entry {key} is being written by"):
            with second.lease():
                pass
    assert not (tmp_path / "fs" / "leases" / f"{key}.json").exists()
    with first.lease(ttl=0.05):
        time.sleep(0.1)
        with second.lease(ttl=60):
            with pytest.raises(StoreError, match="lost the lease"):
                first.refresh_lease()
        assert not (tmp_path / "fs" / "leases" / f"{key}.json").exists()


def test_dask_graph_holds_no_open_files(tmp_path, write_entry):
    import pickle

    store = Store(tmp_path / "fs")
    _, _, entry = write_entry(store)
    arr = entry.array("hidden/mean")
    graph = dict(arr.__dask_graph__())
    restored = pickle.loads(pickle.dumps(graph))
    assert len(restored) == len(graph)
    assert dask.compute(arr.sum())[0] == pytest.approx(float(arr.compute().sum()), rel=1e-5)
