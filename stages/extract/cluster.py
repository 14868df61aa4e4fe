"""Extract on a dask.distributed cluster: one task per (entry, shard), the manifest committed by the client.

The client plans the missing shards of every entry and submits one task per shard, carrying only
that shard's rows. A worker keeps each model it loads in a process-wide cache, so all the shards of
a model that land on it share one load; the client drops the model from every worker once that
model's last shard is in. A task claims its shard with the store's lease and publishes it write-once,
exactly as a local run does, so a worker killed mid-shard leaves only its lease behind (taken over at
once on the same host, after the lease TTL elsewhere) and Dask reruns the task on another worker.
The client commits each entry when all its shards are published: the result is byte-identical to a
single-process run. Every worker must reach the store under the same URL.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.data import Split
from pipeline.errors import PipelineError
from stages.entries import FeatureRequest
from stages.extract.runner import (
    LEASE_TTL,
    EntryStats,
    LoadedModel,
    ShardResult,
    claim_shards,
    compute_and_write,
    count_shard,
    extract_shard,
    load_for_extract,
    n_shards,
    shard_rows_range,
)
from store import fingerprint

log = logging.getLogger(__name__)

GPU_RESOURCE = "GPU"


def is_distributed(scheduler: str) -> bool:
    return scheduler.startswith(("tcp://", "tls://"))


def check_store_reachable(store_url: str, scheduler: str) -> None:
    """Refuse a store that the workers of a distributed scheduler cannot open under the same name."""
    if not is_distributed(scheduler):
        return
    if store_url.startswith("memory://"):
        raise PipelineError(
            f"extract --scheduler {scheduler}: the store {store_url} lives in this process only; "
            "use a shared filesystem path or an s3:// URL that every worker can reach"
        )
    if "://" in store_url and not store_url.startswith("file://"):
        return
    path = store_url.removeprefix("file://")
    if not Path(path).expanduser().is_absolute():
        raise PipelineError(
            f"extract --scheduler {scheduler}: the store path {path!r} is relative, so workers would "
            "resolve it in their own directories; give an absolute path on a filesystem every worker "
            "mounts (e.g. /nfs/team/featurestore) or an s3:// URL"
        )


# worker side ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    """One cluster task: shard ``index`` of entry ``key``, with that shard's rows only.

    ``request.split`` holds just the shard's rows (from ``row_start``), so a task ships its own
    texts rather than the whole split; ``key`` and ``description`` were computed on the client
    from the full split.
    """

    store_url: str
    key: str
    description: dict
    n_shards: int
    index: int
    row_start: int
    request: FeatureRequest
    lease_ttl: float = LEASE_TTL
    code_version: str = "unknown"

    @property
    def model_key(self) -> str:
        return model_cache_key(self.request)


@dataclass(frozen=True)
class ShardFailure:
    """A problem the user must fix (bad device, other model files on the worker): fails the run, not retried."""

    index: int
    message: str


def model_cache_key(request: FeatureRequest) -> str:
    """What a loaded model depends on: its files, device, dtype and code trust (not the entry)."""
    return fingerprint(
        {
            "model": request.spec.identity,
            "source": request.spec.source,
            "device": request.extract.device,
            "compute_dtype": request.extract.compute_dtype,
            "trust_remote_code": request.model.trust_remote_code,
        }
    )


_MODELS: dict[str, LoadedModel] = {}
_LOADING: dict[str, threading.Lock] = {}
_LOCK = threading.Lock()


def cached_model(request: FeatureRequest) -> LoadedModel:
    """The worker's copy of ``request``'s model, loaded on first use and kept until `release_model`."""
    key = model_cache_key(request)
    with _LOCK:
        loading = _LOADING.setdefault(key, threading.Lock())
    with loading:  # several threads of one worker wait for one load
        if key not in _MODELS:
            _check_worker_matches(request)
            _MODELS[key] = load_for_extract(request.model, request.spec, request.extract)()
        return _MODELS[key]


def release_model(key: str) -> bool:
    """Drop a cached model (and its GPU memory); True if this worker held it."""
    import gc

    with _LOCK:
        loaded = _MODELS.pop(key, None)
        _LOADING.pop(key, None)
    if loaded is None:
        return False
    device = loaded.device
    del loaded
    gc.collect()
    if getattr(device, "type", "") == "cuda":
        import torch

        torch.cuda.empty_cache()
    return True


def cached_models() -> list[str]:
    """Keys of the models this worker holds (for tests and diagnostics)."""
    return sorted(_MODELS)


def _check_worker_matches(request: FeatureRequest) -> None:
    """The bytes must match the key the client computed: same model files, same compute dtype."""
    import socket

    from pipeline.device import compute_dtype_name, resolve_device
    from pipeline.models import resolve

    host = socket.gethostname()
    spec = resolve(request.model.source, request.model.revision)
    if spec.identity != request.spec.identity:
        raise PipelineError(
            f"worker {host}: model {request.model.source!r} resolves to other files than on the client "
            f"({spec.identity} != {request.spec.identity}); give every worker the same checkpoint"
        )
    planned = request.key_material()["compute_dtype"]
    device = resolve_device(request.extract.device)
    if compute_dtype_name(request.extract.compute_dtype, device.type) != planned:
        raise PipelineError(
            f"worker {host}: extract.device = {request.extract.device!r} is {device.type} here but the "
            f"client planned {planned} compute; set extract.device (and compute_dtype) explicitly"
        )


def run_shard(job: ShardJob) -> ShardResult | ShardFailure:
    """A cluster task: claim the shard's lease, compute it with the cached model, publish it."""
    from store import Store

    request = job.request
    try:
        with Store(job.store_url, code_version=job.code_version).writer(job.key, job.description, n_shards=job.n_shards) as writer:
            for k, lease in claim_shards(writer, [job.index], job.lease_ttl, what=job.description.get("name", job.key)):
                rows = request.split
                compute = functools.partial(extract_shard, cached_model(request), request, list(rows.texts), job.row_start, rows.labels)
                return compute_and_write(compute, writer, k, lease)
    except PipelineError as e:
        return ShardFailure(job.index, str(e))
    return ShardResult(job.index)  # published by someone else meanwhile


# client side ------------------------------------------------------------------------------------------


def shard_jobs(
    request: FeatureRequest, store_url: str, indices: list[int], *, n_total: int, lease_ttl: float, code_version: str
) -> list[ShardJob]:
    key, description = request.key, request.description()
    jobs = []
    for k in indices:
        lo, hi = shard_rows_range(request, k)
        s = request.split
        rows = Split(s.dataset, s.name, tuple(s.texts[lo:hi]), s.labels[lo:hi], s.path)
        jobs.append(
            ShardJob(store_url, key, description, n_total, k, lo, dataclasses.replace(request, split=rows), lease_ttl, code_version)
        )
    return jobs


def connect(address: str, timeout: float = 10.0):
    from distributed import Client

    try:
        return Client(address, timeout=f"{timeout}s", set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise PipelineError(f"extract.scheduler: cannot reach dask scheduler at {address} ({e})") from None


def _check_workers(client, address: str, gpu: bool, timeout: float) -> None:
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise PipelineError(
            f"no dask worker joined {address} within {timeout:.0f} s; start some with `dask worker {address} --nthreads 1`"
        ) from None
    if gpu:
        try:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()  # newer distributed lists 5 by default
        except TypeError:
            workers = client.scheduler_info()["workers"].values()
        if not any((w.get("resources") or {}).get(GPU_RESOURCE, 0) >= 1 for w in workers):
            raise PipelineError(
                f"extract.device is CUDA but no worker of {address} offers the {GPU_RESOURCE} resource; "
                f"start one worker per GPU: `CUDA_VISIBLE_DEVICES=i dask worker {address} --nthreads 1 --resources {GPU_RESOURCE}=1`"
            )


@dataclass
class _EntryRun:
    """Client-side state of one entry on the cluster: its writer, the shards still out, its stats."""

    request: FeatureRequest
    writer: object
    stats: EntryStats
    left: set[int]


def _submit(client, requests: list[FeatureRequest], store, *, gpu: bool, lease_ttl: float, retries: int):
    """Submit the missing shards model by model; commit entries that need no shard at once.

    Returns (entry key -> _EntryRun, future -> (entry key, model key), model key -> shards out).
    """
    by_model: dict[str, list[FeatureRequest]] = {}
    for r in requests:
        by_model.setdefault(model_cache_key(r), []).append(r)
    runs: dict[str, _EntryRun] = {}
    owner: dict = {}
    model_left: dict[str, int] = {}
    for rank, (mkey, reqs) in enumerate(by_model.items()):
        model_left[mkey] = 0
        for r in reqs:
            st = EntryStats(r.model.name, r.split.name)
            if store.exists(r.key):
                st.cached = st.committed = True
                runs[r.key] = _EntryRun(r, None, st, set())
                continue
            total = n_shards(len(r.split), r.extract.shard_rows)
            writer = store.writer(r.key, r.description(), n_shards=total)
            todo = sorted(set(range(total)) - writer.done_shards())
            runs[r.key] = _EntryRun(r, writer, st, set(todo))
            if not todo:
                writer.commit(expected_shards=total)
                writer.close()
                st.committed = True
            for job in shard_jobs(r, store.url, todo, n_total=total, lease_ttl=lease_ttl, code_version=store.code_version):
                fut = client.submit(
                    run_shard,
                    job,
                    key=f"extract-shard-{r.key[:16]}-{job.index:05d}",
                    pure=False,
                    priority=len(by_model) - rank,
                    retries=retries,
                    resources={GPU_RESOURCE: 1} if gpu else None,
                )
                owner[fut] = (r.key, mkey)
                model_left[mkey] += 1
    return runs, owner, model_left


def extract_on_cluster(
    requests: list[FeatureRequest],
    store,
    address: str,
    *,
    progress: bool = True,
    lease_ttl: float = LEASE_TTL,
    retries: int = 2,
    worker_timeout: float = 60.0,
) -> list[EntryStats]:
    """Compute the missing shards of ``requests`` on the workers of ``address``; commit each entry here.

    Tasks are submitted model by model (earlier models first), so a worker finishes with one model
    before it needs the next; once a model's last shard is in, every worker drops it. Dask reruns a
    task whose worker died, and up to ``retries`` times one that raised. An entry's ``seconds`` is
    the compute time of its shards summed over the workers.
    """
    from distributed import as_completed

    from pipeline.device import device_type
    from pipeline.progress import tqdm

    gpu = any(device_type(r.extract.device) == "cuda" for r in requests)
    client = connect(address)
    owner: dict = {}
    runs: dict[str, _EntryRun] = {}
    try:
        _check_workers(client, address, gpu, worker_timeout)
        runs, owner, model_left = _submit(client, requests, store, gpu=gpu, lease_ttl=lease_ttl, retries=retries)
        bar = tqdm(total=len(owner), desc=f"extract on {address}", unit="shard", disable=not progress or not owner)
        rows, t0 = 0, time.perf_counter()
        for fut in as_completed(list(owner), loop=client.loop):
            key, mkey = owner[fut]
            run = runs[key]
            try:
                res = fut.result()
            except Exception as e:  # noqa: BLE001 - any task failure ends the run with one line
                raise PipelineError(f"extract of {run.stats.model}/{run.stats.split} failed on the cluster: {type(e).__name__}: {e}") from e
            if isinstance(res, ShardFailure):
                raise PipelineError(res.message)
            count_shard(run.stats, res)
            rows += res.rows
            run.left.discard(res.index)
            if not run.left:
                run.writer.commit(expected_shards=run.writer.n_shards)
                run.writer.close()
                run.stats.committed = True
            model_left[mkey] -= 1
            if model_left[mkey] == 0:
                client.run(release_model, mkey, on_error="ignore")
            bar.update(1)
            bar.set_postfix_str(f"{rows / (time.perf_counter() - t0):,.0f} rows/s")
        bar.close()
    finally:
        pending = [f for f in owner if not f.done()]
        if pending:
            client.cancel(pending)
        client.close()
        for run in runs.values():
            if run.writer is not None:
                run.writer.close()
    for run in runs.values():
        if run.stats.truncated:
            log.warning("%s/%s: %d text(s) were truncated to max_length", run.stats.model, run.stats.split, run.stats.truncated)
    return [runs[r.key].stats for r in requests]
