"""A local dask.distributed cluster whose workers cannot quietly exceed their memory."""

import contextlib

import dask


@contextlib.contextmanager
def memory_bounded_client(memory_limit):
    """Two single-threaded worker processes limited to ``memory_limit`` each. Pausing and spilling
    are off, so a worker that outgrows its limit is killed (at 95%) instead of waiting forever;
    a restart shows up as a changed worker set."""
    import distributed

    no_pause = {
        "distributed.worker.memory.target": False,
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.pause": False,
    }
    with (
        dask.config.set(no_pause),
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, memory_limit=memory_limit, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        assert all(client.run(lambda: dask.config.get("distributed.worker.memory.pause") is False).values())
        yield client
