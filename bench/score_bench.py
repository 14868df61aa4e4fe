"""score_read_fraction, score_peak_rss and scaling_score on synthetic stores of realistic shape.

The synthetic entry has the datasets and shapes extract writes for all-MiniLM-L6-v2 (6 layers,
hidden 384, FFN 1536, float16, 2048-row shards), so score reads what it reads in production.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, Plan, Timer, env, median, result, scaling_result

LAYERS, HIDDEN, FFN, SHARD_ROWS = 6, 384, 1536, 2048
POOLINGS = ("mean", "first", "last")
ROW_BYTES = len(POOLINGS) * (LAYERS + 1) * HIDDEN * 2 + 2 * LAYERS * FFN * 2


def make_store(path: Path, target_mb: float, seed: int = 0) -> tuple[str, str, int]:
    """A committed entry of about ``target_mb`` MB; returns (store url, key, rows)."""
    from store import Store, fingerprint

    rows = max(64, int(target_mb * 2**20 / ROW_BYTES))
    rng = np.random.default_rng(seed)
    desc = {
        "kind": "features",
        "name": f"bench/synthetic/{rows}",
        "n_layers": LAYERS,
        "hidden_size": HIDDEN,
        "ffn_size": FFN,
        "rows": rows,
        "seed": seed,
    }
    key = fingerprint(desc)
    n_shards = -(-rows // SHARD_ROWS)
    store = Store(str(path))
    writer = store.writer(key, desc, n_shards=n_shards)
    for k in range(n_shards):
        lo, hi = k * SHARD_ROWS, min((k + 1) * SHARD_ROWS, rows)
        n = hi - lo
        labels = rng.integers(0, 2, n)
        shift = (labels[:, None, None] * 0.3).astype(np.float32)
        arrays = {
            f"hidden/{p}": (rng.standard_normal((n, LAYERS + 1, HIDDEN), dtype=np.float32) + shift).astype(np.float16) for p in POOLINGS
        }
        arrays["ffn/mean"] = (rng.standard_normal((n, LAYERS, FFN), dtype=np.float32) * 0.2).astype(np.float16)
        arrays["ffn/max"] = (rng.standard_normal((n, LAYERS, FFN), dtype=np.float32) + 0.5).astype(np.float16)
        n_tok = rng.integers(5, 60, n)
        arrays["ffn/fire_count"] = rng.integers(0, int(n_tok.sum()), (LAYERS, FFN)).astype(np.int64)
        table = {
            "row": np.arange(lo, hi, dtype=np.int64),
            "label": labels.astype(np.int64),
            "text": [f"synthetic sentence {i} about physics" if i % 7 == 0 else f"synthetic sentence {i}" for i in range(lo, hi)],
            "n_tokens": n_tok.astype(np.int64),
            "truncated": np.zeros(n, dtype=bool),
        }
        import pandas as pd

        writer.write_shard(
            k,
            arrays,
            pd.DataFrame(table),
            row_start=lo,
            attrs={"ffn/fire_count": {"threshold": 0.0, "n_tokens": int(n_tok.sum()), "special_tokens_counted": False}},
        )
    writer.commit(expected_shards=n_shards)
    return str(path), key, rows


def run_score(url: str, key: str, rows_per_chunk: int, scheduler="threads") -> int:
    """``score_entry`` on the entry: variability for every pooling plus sparsity, as the stage runs it
    (a hashed scan of every shard file, then the hidden poolings again for variability's second pass).

    Returns the bytes of the datasets it consumed (each counted once)."""
    from types import SimpleNamespace as NS

    from stages.score.runner import score_entry
    from store import Store

    entry = Store(url).open(key)
    request = NS(
        split=NS(dataset="bench", name="train"),
        model=NS(name="synthetic", threshold=0.0),
        extract=NS(poolings=POOLINGS, ffn_poolings=("mean", "max")),
        spec=NS(random_init=False),
    )
    score_entry(entry, request, ["physics"], rows_per_chunk=rows_per_chunk, scheduler=scheduler)
    return _used_bytes(url, key)


@functools.cache
def _used_bytes(url: str, key: str) -> int:
    """Bytes of the datasets score consumes, each counted once (hidden poolings, ffn/max, fire counts)."""
    from store import Store

    entry = Store(url).open(key)
    used = sum(entry.array(f"hidden/{p}").nbytes for p in POOLINGS)
    return int(used + entry.array("ffn/max").nbytes + entry.per_shard("ffn/fire_count").nbytes)


def plain_read(url: str) -> int:
    """Sequential h5py read of every dataset of every shard file; returns bytes read."""
    import h5py

    total = 0
    for f in sorted(Path(url).rglob("*.h5")):
        with h5py.File(f, "r") as fh:
            names: list[str] = []
            fh.visititems(lambda n, o, names=names: names.append(n) if isinstance(o, h5py.Dataset) else None)
            for n in names:
                total += fh[n][()].nbytes
    return total


def hash_files(url: str, workers: int = 1) -> int:
    """SHA-256 of every shard file in 4 MiB blocks (what score's scan hashes), no parsing, ``workers``
    files at once (hashlib releases the GIL); returns bytes."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    def one(f: Path) -> int:
        n = 0
        h = hashlib.sha256()
        with open(f, "rb", buffering=0) as fh:
            while block := fh.read(4 * 2**20):
                h.update(block)
                n += len(block)
        return n

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, sorted(Path(url).rglob("*.h5"))))


class _NoDigest:
    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


@contextlib.contextmanager
def shard_hash_skipped():
    """Score's shard scans with SHA-256 left out (bench only): what score's own arithmetic costs."""
    from types import SimpleNamespace

    import store.scan as scan

    saved = scan.hashlib, scan._mismatch
    scan.hashlib, scan._mismatch = SimpleNamespace(sha256=_NoDigest), lambda *a: None
    try:
        yield
    finally:
        scan.hashlib, scan._mismatch = saved


def evict(url: str) -> None:
    """Drop the store's files from the page cache (flushed first), so the next read comes from disk.

    ``posix_fadvise(DONTNEED)`` needs no privileges and touches only these files.
    """
    for f in Path(url).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def score_read_fraction(plan: Plan, tmp: Path) -> tuple[dict, tuple[str, str, int]]:
    target = plan.score_limit_mb * 3.2
    url, key, rows = make_store(tmp / "score-store", target)
    run_score(url, key, plan.score_rows_per_chunk)  # warm-up (imports, page cache)
    plain_t, score_t, hash_t, hash_all_t, unhashed_t = [], [], [], [], []
    plain_b = score_b = 0
    cores = os.cpu_count() or 1
    for _ in range(max(2, plan.reps)):
        with Timer() as t:
            plain_b = plain_read(url)
        plain_t.append(t.wall)
        with Timer() as t:
            hash_files(url)
        hash_t.append(t.wall)
        with Timer() as t:
            hash_files(url, workers=cores)
        hash_all_t.append(t.wall)
        with Timer() as t:
            score_b = run_score(url, key, plan.score_rows_per_chunk)
        score_t.append(t.wall)
        with shard_hash_skipped(), Timer() as t:
            run_score(url, key, plan.score_rows_per_chunk)
        unhashed_t.append(t.wall)
    cold_plain_t, cold_score_t = [], []
    if hasattr(os, "posix_fadvise"):
        for _ in range(max(2, plan.reps)):
            evict(url)
            with Timer() as t:
                plain_read(url)
            cold_plain_t.append(t.wall)
            evict(url)
            with Timer() as t:
                run_score(url, key, plan.score_rows_per_chunk)
            cold_score_t.append(t.wall)
    store_bytes = sum(p.stat().st_size for p in Path(url).rglob("*") if p.is_file())
    rate_score = [score_b / t for t in score_t]
    rate_plain = [plain_b / t for t in plain_t]
    return {
        "score_read_fraction": result(
            median(rate_score) / 2**20,
            median(rate_plain) / 2**20,
            "MiB/s (score effective / plain h5py read)",
            {
                "store_mib": round(store_bytes / 2**20, 1),
                "memory_limit_mib": plan.score_limit_mb,
                "store_over_limit": round(store_bytes / 2**20 / plan.score_limit_mb, 2),
                "rows": rows,
                "rows_per_chunk": plan.score_rows_per_chunk,
                "score_bytes_consumed": score_b,
                "plain_bytes_read": plain_b,
                "score_seconds": [round(x, 3) for x in score_t],
                "plain_seconds": [round(x, 3) for x in plain_t],
                "sha256_seconds": [round(x, 3) for x in hash_t],
                # what the ratio would be if score cost nothing but hashing every shard byte once
                "ratio_if_only_hashing": round(median([score_b / h / (plain_b / p) for h, p in zip(hash_t, plain_t)]), 3),
                # the same with every core hashing a shard file at once (score's scans run in parallel)
                "sha256_all_cores_seconds": [round(x, 3) for x in hash_all_t],
                "ratio_if_only_hashing_all_cores": round(median([score_b / h / (plain_b / p) for h, p in zip(hash_all_t, plain_t)]), 3),
                # score with the SHA-256 left out of its scans: its own reads and arithmetic
                "unhashed_score_seconds": [round(x, 3) for x in unhashed_t],
                "ratio_without_hashing": round(median([score_b / u / (plain_b / p) for u, p in zip(unhashed_t, plain_t)]), 3),
                # the same pair with the files dropped from the page cache first: a store larger than memory
                "cold_plain_seconds": [round(x, 3) for x in cold_plain_t],
                "cold_score_seconds": [round(x, 3) for x in cold_score_t],
                "cold_ratio": round(median([score_b / s / (plain_b / p) for s, p in zip(cold_score_t, cold_plain_t)]), 3)
                if cold_plain_t
                else None,
                "scheduler": "dask threads",
                "page_cache": "warm for both (files just written / read); cold_* evict them first (posix_fadvise)",
                "note": "score_entry: one hashed scan per shard file (every byte read once and checked against the manifest's sha256; variability pass 1 and sparsity from the same bytes), then variability pass 2 re-reads the hidden poolings through the same open handle; effective bytes count every consumed dataset once",
                "goal": ">= 0.5",
            },
            ratio=median([s / p for s, p in zip(rate_score, rate_plain)]),
        )
    }, (url, key, rows)


def score_peak_rss(plan: Plan, store: tuple[str, str, int]) -> dict:
    url, key, rows = store
    code = f"from bench.score_bench import _rss_child; _rss_child({url!r}, {key!r}, {plan.score_rows_per_chunk})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=900)
    if out.returncode:
        raise RuntimeError(f"score RSS child failed: {out.stderr[-2000:]}")
    m = json.loads(out.stdout.strip().splitlines()[-1])
    threads = os.cpu_count() or 1
    chunk = plan.score_rows_per_chunk * LAYERS * FFN * 2  # the largest chunk: ffn/max rows, float16
    acc = 3 * LAYERS * FFN * 8 * 2 + 3 * (LAYERS + 1) * HIDDEN * 8 * 2  # (K+1, L, F) int64 + (K+1, L, d) float64, two live
    reference = threads * chunk + acc
    delta = m["peak"] - m["baseline"]
    return {
        "score_peak_rss": result(
            delta / 2**20,
            reference / 2**20,
            "MiB (peak RSS increase / threads x chunk + accumulators)",
            {
                "baseline_mib": round(m["baseline"] / 2**20, 1),
                "peak_mib": round(m["peak"] / 2**20, 1),
                "chunk_mib": round(chunk / 2**20, 2),
                "threads": threads,
                "accumulators_mib": round(acc / 2**20, 3),
                "store_mib": round(sum(p.stat().st_size for p in Path(url).rglob("*") if p.is_file()) / 2**20, 1),
                "memory_limit_mib": plan.score_limit_mb,
                "within_limit": delta / 2**20 <= plan.score_limit_mb,
                "seconds": round(m["seconds"], 2),
                "method": "subprocess; /proc/self/statm sampled every 2 ms; baseline after imports and the row table",
                "goal": "bounded by chunk x threads + accumulators (a small constant factor), below the limit, independent of store size",
            },
        )
    }


def _rss_child(url: str, key: str, rows_per_chunk: int) -> None:
    import dask  # noqa: F401 - imports before the baseline
    import dask.array  # noqa: F401
    import scipy.special  # noqa: F401 - the keyword p-values' import, not data

    with contextlib.suppress(ImportError):  # dask.compute imports it to look for a client (about 12 MiB)
        import distributed  # noqa: F401

    from stages.score import runner, sparsity, variability  # noqa: F401
    from store import Store

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    Store(url).open(key).table()
    baseline = rss()
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    run_score(url, key, rows_per_chunk)
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    print(json.dumps({"baseline": baseline, "peak": max(peak[0], rss()), "seconds": seconds}))


def scaling_score(plan: Plan, tmp: Path) -> dict:
    stores = {k: make_store(tmp / f"scale-{k}x", plan.score_scale_mb * k, seed=k) for k in (1, 2, 4)}
    for url, key, _ in stores.values():
        run_score(url, key, plan.score_rows_per_chunk)
    times: dict[int, list[float]] = {k: [] for k in stores}
    for _ in range(max(2, min(plan.reps, 3))):
        for k, (url, key, _) in stores.items():
            with Timer() as t:
                run_score(url, key, plan.score_rows_per_chunk)
            times[k].append(t.wall)
    return {
        "scaling_score": scaling_result(
            times, {"rows": {f"{k}x": v[2] for k, v in stores.items()}, "rows_per_chunk": plan.score_rows_per_chunk}
        )
    }
