"""score on a dask.distributed cluster (a scheduler and two worker processes started as a user would,
with the `dask scheduler` / `dask worker` commands) gives the same tables as the local scheduler."""

from __future__ import annotations

import subprocess
import sys
import time

import pandas as pd
import pytest
from sharing_helpers import cli_env, write_config

from pipeline.cli import main

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow

TABLES = ("variability.parquet", "sparsity.parquet", "neurons.parquet")


@pytest.fixture
def cluster(tmp_path):
    """tcp:// address of a scheduler with two single-threaded worker processes."""
    sched_file = tmp_path / "scheduler.json"
    common = dict(cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--scheduler-file",
                str(sched_file),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
            ],
            **common,
        )
    ]
    try:
        deadline = time.time() + 60
        while not sched_file.exists():
            assert time.time() < deadline and procs[0].poll() is None, "dask scheduler did not start"
            time.sleep(0.2)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    "--scheduler-file",
                    str(sched_file),
                    "--nworkers",
                    "2",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                    "--memory-limit",
                    "1GB",
                ],
                **common,
            )
        )
        with distributed.Client(scheduler_file=str(sched_file), timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
            worker_pids = set(client.run(lambda: __import__("os").getpid()).values())
            yield client, worker_pids
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_score_on_cluster_matches_local(tmp_path, cluster):
    client, worker_pids = cluster
    address = client.scheduler.address
    assert len(worker_pids) == 2
    cfg = str(write_config(tmp_path / "tiny.toml", models=("llama", "bert"), limit=60, shard_rows=16))
    store = str(tmp_path / "fs")
    assert main(["extract", "--config", cfg, "--store", store, "-q"]) == 0
    assert main(["score", "--config", cfg, "--store", store, "--out", str(tmp_path / "local"), "-q"]) == 0
    assert main(["score", "--config", cfg, "--store", store, "--out", str(tmp_path / "cluster"), "--scheduler", address, "-q"]) == 0
    prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert any("score-scan" in p for p in prefixes), prefixes  # the workers read (and hash) the shards
    for name in TABLES:
        local, remote = pd.read_parquet(tmp_path / "local" / name), pd.read_parquet(tmp_path / "cluster" / name)
        assert len(local) > 0
        pd.testing.assert_frame_equal(local, remote, check_exact=False, rtol=1e-9)
