"""Entry arrays are plain Dask graphs: they compute on the local scheduler and on distributed workers."""

from __future__ import annotations

import numpy as np
import pytest

from store import Store


@pytest.mark.slow
def test_arrays_on_local_cluster_with_processes(tmp_path, write_entry):
    distributed = pytest.importorskip("distributed")
    store = Store(tmp_path / "fs")
    key, inputs, _ = write_entry(store, n_shards=4)
    entry = Store(tmp_path / "fs").open(key)
    expected = np.concatenate([i[0]["hidden/mean"] for i in inputs])
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as client,
    ):
        mean = entry.array("hidden/mean", rows_per_chunk=3)
        np.testing.assert_array_equal(client.compute(mean).result(), expected)
        np.testing.assert_allclose(client.compute(mean.mean(axis=0)).result(), expected.mean(axis=0), rtol=1e-6)
        fire = client.compute(entry.per_shard("ffn/fire_count").sum(axis=0)).result()
        np.testing.assert_array_equal(fire, sum(i[0]["ffn/fire_count"] for i in inputs))
