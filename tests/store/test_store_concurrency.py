"""Several processes writing overlapping shards of one entry end with one manifest and a valid entry."""

from __future__ import annotations

import multiprocessing as mp
import random

import numpy as np
import pytest

from store import Store, fingerprint


def _write_and_commit(url: str, key: str, description: dict, inputs: list, seed: int) -> dict:
    """Child process: write every shard in a random order, then commit."""
    store = Store(url)
    w = store.writer(key, description, n_shards=len(inputs))
    order = list(range(len(inputs)))
    random.Random(seed).shuffle(order)
    for i in order:
        arrays, table, row_start, attrs = inputs[i]
        w.write_shard(i, arrays, table, row_start=row_start, attrs=attrs)
    return w.commit().manifest


@pytest.mark.slow
def test_four_processes_overlapping_shards(tmp_path, description, make_shard):
    url = str(tmp_path / "fs")
    desc = description()
    key = fingerprint(desc)
    inputs = [make_shard(i) for i in range(6)]
    with mp.get_context("spawn").Pool(4) as pool:
        manifests = pool.starmap(_write_and_commit, [(url, key, desc, inputs, seed) for seed in range(4)])
    assert all(m == manifests[0] for m in manifests)
    store = Store(url)
    assert store.verify() == []
    entry = store.open(key)
    assert entry.manifest == manifests[0] and entry.n_rows == 30
    np.testing.assert_array_equal(entry.array("hidden/mean").compute(), np.concatenate([i[0]["hidden/mean"] for i in inputs]))
    assert list((tmp_path / "fs" / "tmp").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "fs" / "entries" / key).iterdir()) == sorted(
        ["manifest.json"] + [f"shard_{i:05d}.{ext}" for i in range(6) for ext in ("h5", "parquet")]
    )
