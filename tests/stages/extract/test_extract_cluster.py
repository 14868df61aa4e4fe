"""extract on a dask.distributed cluster started as a user would (`dask scheduler`, two `dask worker`
processes on 127.0.0.1): the entries verify and every shard is byte-identical to a single-process run,
also when a worker is SIGKILLed while it holds a shard; a store the workers cannot reach is refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
from config_factory import ROOT, SST2, write_config

from pipeline.cli import main
from pipeline.config import load_config

distributed = pytest.importorskip("distributed")


def tiny_config(path: Path, limit: int = 96, **extract: str) -> Path:
    """configs/tiny.toml (four families) with an absolute data path and fewer rows."""
    shipped = tomllib.loads((ROOT / "configs" / "tiny.toml").read_text(encoding="utf-8"))
    overrides = {"data.path": str(SST2), "data.limit": limit, **{f"extract.{k}": v for k, v in extract.items()}}
    return write_config(path, shipped, overrides)


def env() -> dict[str, str]:
    """Children load this checkout's code, one torch thread each (they share 2 cores), offline."""
    e = dict(os.environ)
    e.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
    )
    return e


def shard_digests(store: Path) -> dict[str, str]:
    """entry/shard file -> sha256 for every shard of every entry (manifests hold a timestamp)."""
    return {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((store / "entries").glob("*/shard_*"))}


def stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


@dataclasses.dataclass
class Cluster:
    address: str
    client: object
    logs: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A `dask scheduler` and two `dask worker --nworkers 1 --nthreads 1` processes on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("cluster")
    sched_file = tmp / "scheduler.json"
    procs: list[subprocess.Popen] = []
    logs = []

    def start(name: str, *args: str) -> None:
        log = open(tmp / f"{name}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", *args], cwd=tmp, env=env(), stdout=log, stderr=subprocess.STDOUT))

    try:
        start(
            "scheduler",
            "distributed.cli.dask_scheduler",
            "--scheduler-file",
            str(sched_file),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
        )
        deadline = time.time() + 60
        while not sched_file.exists():
            assert time.time() < deadline and procs[0].poll() is None, (tmp / "scheduler.log").read_text()
            time.sleep(0.2)
        for i in range(2):
            start(
                f"worker{i}",
                "distributed.cli.dask_worker",
                "--scheduler-file",
                str(sched_file),
                "--host",
                "127.0.0.1",
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--no-dashboard",
                "--memory-limit",
                "2GB",
                "--name",
                f"w{i}",
            )
        with distributed.Client(scheduler_file=str(sched_file), timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
            yield Cluster(client.scheduler.address, client, tmp)
    finally:
        stop(procs)
        for log in logs:
            log.close()


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The tiny config extracted by one local process: (config path, shard digests)."""
    tmp = tmp_path_factory.mktemp("single")
    cfg = tiny_config(tmp / "tiny.toml")
    assert main(["extract", "--config", str(cfg), "--store", str(tmp / "fs"), "-q"]) == 0
    digests = shard_digests(tmp / "fs")
    assert len(digests) == 4 * 3 * 2 * 2  # models x splits x shards x (h5, parquet)
    return cfg, digests


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cluster_extract_is_byte_identical_to_a_single_process(tmp_path, cluster, single_process):
    cfg, reference = single_process
    store = tmp_path / "fs"

    def count_model_loads():
        """On every worker: count the model loads per model (the real loader still runs)."""
        import collections

        import stages.extract.cluster as cl

        real, cl.load_counts = cl.load_for_extract, collections.Counter()

        def counting(model_cfg, spec, extract_cfg):
            cl.load_counts[model_cfg.name] += 1
            return real(model_cfg, spec, extract_cfg)

        cl.load_for_extract = counting

    cluster.client.run(count_model_loads)
    done = run_cli("extract", "--config", str(cfg), "--store", str(store), "--scheduler", cluster.address)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "committed" in done.stderr and "shard" in done.stderr  # the summary table and the client's progress bar
    assert shard_digests(store) == reference
    assert main(["store", "verify", "--store", str(store)]) == 0
    assert not list((store / "leases").iterdir())
    prefixes = cluster.client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert "extract-shard" in " ".join(prefixes), prefixes  # the workers computed the shards
    from stages.extract.cluster import cached_models

    assert set(map(tuple, cluster.client.run(cached_models).values())) == {()}  # every model released
    loads = cluster.client.run(lambda: dict(__import__("stages.extract.cluster").extract.cluster.load_counts))
    assert all(n == 1 for counts in loads.values() for n in counts.values()), loads  # one load per model per worker
    assert set().union(*loads.values()) == {"llama", "bert", "roberta", "t5"}, loads


@pytest.mark.slow
def test_cuda_device_without_gpu_workers_is_refused(tmp_path, cluster):
    cfg = tiny_config(tmp_path / "cuda.toml", limit=8, device="cuda")
    done = run_cli("extract", "--config", str(cfg), "--store", str(tmp_path / "fs"), "--scheduler", cluster.address, "-q")
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: extract.device is CUDA but no worker of") and "--resources GPU=1" in done.stderr


@pytest.mark.slow
def test_worker_killed_mid_shard_loses_only_that_shard(tmp_path, cluster, single_process):
    cfg, reference = single_process
    store, marker = tmp_path / "fs", tmp_path / "holding.json"
    victim = sorted(cluster.client.scheduler_info(n_workers=-1)["workers"])[0]

    def hold_the_first_shard(marker: str):
        """On the victim worker: announce the first shard it is computing, then hang in it."""
        import json as _json
        import os as _os
        import time as _time

        import stages.extract.cluster as cl

        real = cl.extract_shard

        def hanging(loaded, request, texts, row_start, labels, progress=None):
            Path(marker).write_text(_json.dumps({"pid": _os.getpid(), "row_start": row_start, "split": request.split.name}))
            _time.sleep(120)
            return real(loaded, request, texts, row_start, labels, progress)

        cl.extract_shard = hanging

    cluster.client.run(hold_the_first_shard, str(marker), workers=[victim])
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "extract", "--config", str(cfg), "--store", str(store), "--scheduler", cluster.address, "-q"],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else "no shard held"
            time.sleep(0.1)
        time.sleep(0.2)
        held = json.loads(marker.read_text())
        leases = [json.loads(p.read_text()) for p in (store / "leases").glob("*.shard_*.json")]
        assert held["pid"] in [lease["pid"] for lease in leases]  # it holds a shard's lease
        os.kill(held["pid"], signal.SIGKILL)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, out
    assert shard_digests(store) == reference
    assert main(["store", "verify", "--store", str(store)]) == 0
    from store.lease import Lease

    left = {p.name: json.loads(p.read_text()) for p in (store / "leases").iterdir()}
    assert not any(".shard_" in name for name in left), left  # the killed worker's shard lease was taken over
    assert not any(Lease.is_live(body) for body in left.values()), left  # at most its dead writer lease stays, for gc


def test_remote_scheduler_with_a_relative_store_is_refused(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path / "tiny.toml")
    monkeypatch.chdir(tmp_path)
    assert main(["extract", "--config", str(cfg), "--store", "fs", "--scheduler", "tcp://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: extract --scheduler tcp://127.0.0.1:9: the store path 'fs' is relative") and "\n" not in err
    assert not (tmp_path / "fs").exists()
    remote = tiny_config(tmp_path / "remote.toml", scheduler="tcp://127.0.0.1:9")
    assert main(["extract", "--config", str(remote), "--store", "file://fs", "-q"]) == 1
    assert "is relative" in capsys.readouterr().err


def test_shard_flag_with_a_remote_scheduler_is_refused(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "tiny.toml")
    assert (
        main(["extract", "--config", str(cfg), "--store", str(tmp_path / "fs"), "--scheduler", "tcp://127.0.0.1:9", "--shard", "0/2"]) == 1
    )
    assert "--shard 0/2" in capsys.readouterr().err


@pytest.mark.slow  # waits out the 10 s connect timeout
def test_unreachable_scheduler_is_one_line(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "tiny.toml", limit=8)
    assert main(["extract", "--config", str(cfg), "--store", str(tmp_path / "fs"), "--scheduler", "tcp://127.0.0.1:9", "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: extract.scheduler: cannot reach dask scheduler at tcp://127.0.0.1:9") and "\n" not in err


def test_scheduler_is_validated_and_not_in_the_key(tmp_path):
    from pipeline.errors import ConfigError
    from stages.entries import feature_requests

    local = load_config(tiny_config(tmp_path / "a.toml", limit=8))
    remote = load_config(tiny_config(tmp_path / "b.toml", limit=8, scheduler="tcp://10.0.0.1:8786"))
    assert local.extract.scheduler == "local" and remote.extract.scheduler == "tcp://10.0.0.1:8786"
    assert [r.key for r in feature_requests(local)] == [r.key for r in feature_requests(remote)]
    with pytest.raises(ConfigError, match=r"extract.scheduler: 'threads' is not valid; allowed: local or tcp://host:port"):
        load_config(tiny_config(tmp_path / "c.toml", scheduler="threads"))
