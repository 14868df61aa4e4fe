"""Same numbers on dask.distributed, and bounded memory out of core."""

import dask.array as da
import numpy as np
import pytest
from dask_cluster import memory_bounded_client

from stages.score.sparsity import sparsity_stats
from stages.score.variability import variability_by_layer

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes, as the brief's cluster."""
    with (
        distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0") as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


@pytest.fixture
def small_client():
    """Workers limited to 200 MB each, killed rather than paused when they outgrow it."""
    with memory_bounded_client("200MB") as c:
        yield c


def test_variability_same_numbers_as_threads(client):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 501)
    X = rng.normal(size=(501, 3, 50)) + rng.normal(size=(4, 3, 50))[y]
    Xd = da.from_array(X.astype(np.float16), chunks=(64, 2, 50))
    local = variability_by_layer(Xd, y, scheduler="threads")
    remote = variability_by_layer(Xd, y, scheduler=client)
    for a, b in zip(local, remote):
        assert (a.rank, a.n_rows, a.n_classes) == (b.rank, b.n_rows, b.n_classes)
        assert b.nu == pytest.approx(a.nu, rel=1e-12)


def test_sparsity_same_numbers_as_threads(client):
    rng = np.random.default_rng(1)
    ffn_max = da.from_array(rng.normal(size=(300, 2, 40)).astype(np.float16), chunks=(70, 1, 40))
    fire = da.from_array(rng.integers(0, 50, size=(3, 2, 40)), chunks=(1, 2, 40))
    args = (fire, [500, 600, 700], ffn_max, rng.integers(0, 3, 300), rng.random(300) < 0.3, 0.5)
    for a, b in zip(sparsity_stats(*args, scheduler="threads"), sparsity_stats(*args, scheduler=client)):
        assert a.equals(b)


def test_array_far_larger_than_worker_memory(small_client):
    # 640 MB of lazily generated float64, 10 MB chunks, 200 MB per worker.
    n, n_layers, d = 20_000, 4, 1_000
    X = da.random.default_rng(0).standard_normal((n, n_layers, d), chunks=(312, n_layers, d))
    assert X.nbytes > 3 * 200e6
    y = np.arange(n) % 3
    workers = set(small_client.scheduler_info()["workers"])
    remote = variability_by_layer(X, y, scheduler=small_client)
    assert set(small_client.scheduler_info()["workers"]) == workers
    local = variability_by_layer(X, y, scheduler="threads")
    assert [r.rank for r in remote] == [2] * n_layers
    for a, b in zip(local, remote):
        assert np.isfinite(b.nu) and b.nu == pytest.approx(a.nu, rel=1e-9)
