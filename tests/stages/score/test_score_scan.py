"""Score reads each shard file once, hashing the bytes it reads: the same results as the Dask-array
passes over the same entry, one open and one full read per shard, and a shard changed after commit
fails the run with an error naming it."""

import json
import threading
import time
from types import SimpleNamespace as NS

import numpy as np
import pytest

import bench.score_bench as score_bench
import store.scan as scan_mod
from stages.score.runner import score_entry
from stages.score.sparsity import sparsity_stats
from stages.score.variability import variability_many
from store import CorruptEntryError, Store

POOLINGS = ("mean", "first", "last")
REQUEST = NS(
    split=NS(dataset="d", name="train"),
    model=NS(name="m", threshold=0.0),
    extract=NS(poolings=POOLINGS, ffn_poolings=("mean", "max")),
    spec=NS(random_init=False),
)


@pytest.fixture
def entry(tmp_path, monkeypatch):
    monkeypatch.setattr(score_bench, "SHARD_ROWS", 16)  # several small shards
    url, key, rows = score_bench.make_store(tmp_path / "s", 3.0)
    e = Store(url).open(key)
    assert e.n_shards >= 3
    return e


def _score(entry, scheduler="threads", rows_per_chunk=7):
    return score_entry(entry, REQUEST, ["physics"], rows_per_chunk=rows_per_chunk, scheduler=scheduler)


def test_scan_matches_the_dask_array_passes(entry):
    var, layers, neurons = _score(entry)
    table = entry.table()
    y = table["label"].to_numpy()
    ref = variability_many({p: entry.array(f"hidden/{p}", rows_per_chunk=5) for p in POOLINGS}, y, scheduler="sync")
    for p in POOLINGS:
        got = var[var["pooling"] == p].sort_values("layer")
        np.testing.assert_allclose(got["variability"], [r.nu for r in ref[p]], rtol=1e-9)
        assert got["rank"].tolist() == [r.rank for r in ref[p]]
    kw = np.array(["physics" in t for t in table["text"]])
    attrs = entry.shard_attrs("ffn/fire_count")
    ref_layers, ref_neurons = sparsity_stats(
        entry.per_shard("ffn/fire_count"), [a["n_tokens"] for a in attrs], entry.array("ffn/max"), y, kw, 0.0, scheduler="sync"
    )
    cols = list(ref_layers.columns)
    np.testing.assert_array_equal(layers[cols].to_numpy(), ref_layers.to_numpy())
    for c in ref_neurons.columns:
        np.testing.assert_array_equal(neurons[c].to_numpy(), ref_neurons[c].to_numpy(), err_msg=c)


@pytest.fixture
def opened(monkeypatch):
    """Every shard handle the scans open, in order (``store.scan.open_shard`` is the one place)."""
    handles, lock = [], threading.Lock()
    real = scan_mod.open_shard

    def counting(sfs, path):
        h = real(sfs, path)
        with lock:
            handles.append(h)
        return h

    monkeypatch.setattr(scan_mod, "open_shard", counting)
    return handles


def test_each_shard_file_opened_and_read_once(entry, opened):
    handles = opened
    _score(entry)
    opened = {}
    for h in handles:
        opened[h.path] = opened.get(h.path, 0) + 1
    shards = entry.shard_sources()
    assert sorted(opened) == sorted(s["path"] for s in shards)
    assert set(opened.values()) == {1}, opened  # one open per shard file for both passes
    hidden_row = sum(entry.datasets()[f"hidden/{p}"][0][0] * entry.datasets()[f"hidden/{p}"][0][1] * 2 for p in POOLINGS)
    for h, s in zip(sorted(handles, key=lambda h: h.path), sorted(shards, key=lambda s: s["path"])):
        # the whole file once (hashed), then the hidden rows once more for variability's second pass
        assert h.bytes_read == s["size"] + s["n_rows"] * hidden_row, (h.path, h.bytes_read, s["size"])
    assert all(h.fh.closed for h in handles)  # the run closes the handles it kept


@pytest.mark.parametrize("where", ["data", "metadata"])
@pytest.mark.parametrize("scheduler", ["threads", "sync"])
def test_shard_changed_after_commit_fails_naming_it(entry, opened, where, scheduler):
    src = entry.shard_sources()[1]
    path = src["path"]
    import os

    os.chmod(path, 0o644)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 if where == "data" else 600] ^= 0x01
    open(path, "wb").write(bytes(data))
    assert json.loads(Store(entry._sfs.url).fs.cat(entry._path("manifest.json")))["shards"][1]["sha256"] == src["sha256"]
    with pytest.raises(CorruptEntryError, match=r"shard_00001\.h5: sha256 mismatch"):
        _score(entry, scheduler=scheduler)
    # the failed run leaves no handle open: scans still running when it raised close their own on return
    deadline = time.monotonic() + 10
    while not all(h.fh.closed for h in opened) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert opened and all(h.fh.closed for h in opened)


def test_row_table_changed_after_commit_fails_naming_it(entry):
    import os

    path = entry._path(entry.manifest["shards"][2]["table"])
    os.chmod(path, 0o644)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptEntryError, match=r"shard_00002\.parquet: sha256 mismatch"):
        _score(entry)


def test_truncated_shard_fails_before_reading(entry):
    import os

    path = entry.shard_sources()[0]["path"]
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CorruptEntryError, match=r"shard_00000\.h5: size mismatch"):
        entry.check_sizes()
    with pytest.raises(CorruptEntryError, match=r"shard_00000\.h5: size mismatch"):
        _score(entry)
