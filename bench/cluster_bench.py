"""scaling_extract_workers: extract of configs/tiny.toml on a local Dask cluster, 1 worker against 2.

Both clusters are started once (worker processes, one thread and one torch thread each, imports
warmed up) and timed alternately into fresh stores; each run pays its own model loads, because the
workers drop every model once its shards are in, as on a real cluster. The ratio is the speed-up of
2 workers over 1; on a 2-core machine it cannot exceed 2, and other load on the machine lowers it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from bench.common import ROOT, Plan, Timer, median, paired_ratio, result


def tiny_config(limit: int, tmp: Path) -> Path:
    """configs/tiny.toml (four families) with an absolute data path and ``limit`` rows per split."""
    text = (ROOT / "configs" / "tiny.toml").read_text(encoding="utf-8")
    text = re.sub(r'path = "[./]*data/sst2"', f'path = "{ROOT / "data" / "sst2"}"', text).replace("limit = 200", f"limit = {limit}")
    out = tmp / f"workers-tiny-{limit}.toml"
    out.write_text(text, encoding="utf-8")
    return out


def _warm() -> int:
    import torch  # noqa: F401

    import stages.extract.cluster  # noqa: F401 - torch, transformers and the project, imported before timing

    return os.getpid()


def scaling_extract_workers(plan: Plan, tmp: Path) -> dict:
    """distributed's Nanny writes its workers' ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` into
    this process's ``os.environ`` before spawning them and never takes them back: every later
    subprocess of the bench (``train_stage_seconds``, ``cached_rerun_seconds``) then ran torch on
    one thread, 2.4x slower. The environment is restored once the clusters are closed."""
    saved = dict(os.environ)
    try:
        return _scaling_extract_workers(plan, tmp)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _scaling_extract_workers(plan: Plan, tmp: Path) -> dict:
    from distributed import Client, LocalCluster

    from pipeline.config import load_config
    from pipeline.store_cli import open_store
    from stages.entries import feature_requests
    from stages.extract.cluster import extract_on_cluster

    requests = feature_requests(load_config(tiny_config(plan.workers_limit, tmp)))
    env = {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    clusters = {
        n: LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None, memory_limit="2GB", env=env
        )
        for n in (1, 2)
    }
    times: dict[int, list[float]] = {1: [], 2: []}
    shards = 0
    try:
        for c in clusters.values():
            with Client(c, set_as_default=False) as client:
                client.run(_warm)

        def once(n: int) -> float:
            path = Path(tempfile.mkdtemp(dir=tmp, prefix=f"workers-{n}-"))
            try:
                with Timer() as t:
                    stats = extract_on_cluster(requests, open_store(str(path)), clusters[n].scheduler_address, progress=False)
                assert all(s.committed for s in stats), "bench cluster extract did not commit"
                return t.wall
            finally:
                shutil.rmtree(path, ignore_errors=True)

        if plan.reps > 1:  # warm-up: first model builds, first tasks
            once(1), once(2)
        for _ in range(max(1, min(plan.reps, 3))):
            times[1].append(once(1))
            times[2].append(once(2))
        shards = sum(-(-len(r.split) // r.extract.shard_rows) for r in requests)
    finally:
        for c in clusters.values():
            c.close(timeout=30)
    t1, t2 = median(times[1]), median(times[2])
    return {
        "scaling_extract_workers": result(
            t2,
            t1,
            "seconds (2 Dask workers vs 1; ratio = speed-up)",
            {
                "config": f"configs/tiny.toml, limit {plan.workers_limit}",
                "entries": len(requests),
                "shard_tasks": shards,
                "seconds_1_worker": [round(x, 3) for x in times[1]],
                "seconds_2_workers": [round(x, 3) for x in times[2]],
                "workers": "LocalCluster processes, 1 thread and OMP_NUM_THREADS=1 each, on 127.0.0.1",
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "goal": "> 1, at most 2 on 2 cores",
            },
            ratio=paired_ratio(times[1], times[2]),
        )
    }
