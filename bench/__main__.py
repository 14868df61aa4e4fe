"""``python -m bench [--quick]``: run every benchmark, write results.json and README.md."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import common
from bench.common import FULL, QUICK, ROOT, SMOKE

ORDER = (
    "extract_overhead",
    "bucketing_speedup",
    "store_overhead",
    "scaling_extract",
    "scaling_extract_workers",
    "score_read_fraction",
    "score_peak_rss",
    "scaling_score",
    "cached_rerun_seconds",
    "train_seconds",
    "fused_heads",
    "probe_speedup",
    "train_stage_seconds",
)


def run(plan: common.Plan, only: set[str] | None, cached_store: str | None) -> dict:
    from bench import cached_bench, cluster_bench, extract_bench, score_bench, train_bench

    results: dict = {}

    def want(name: str) -> bool:
        return only is None or name in only

    tmp = Path(tempfile.mkdtemp(prefix="layerstore-bench-"))
    timings = {}

    def step(name: str, fn):
        t0 = time.perf_counter()
        logging.getLogger("bench").info("bench: %s ...", name)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failed benchmark must not hide the others
            traceback.print_exc()
            results[name] = common.result(float("nan"), float("nan"), "error", {"error": f"{type(e).__name__}: {e}"})
            return None
        finally:
            timings[name] = round(time.perf_counter() - t0, 1)
            logging.getLogger("bench").info("bench: %s done in %.1f s", name, timings[name])

    try:
        if plan.threads:
            import torch

            torch.set_num_threads(plan.threads)
        kept = None
        if want("extract_overhead") or want("store_overhead"):
            got = step("extract_overhead", lambda: extract_bench.extract_overhead(plan, tmp))
            if got:
                results.update(got[0])
                kept = got[1]
        if want("store_overhead") and kept is not None:
            results.update(step("store_overhead", lambda: {"store_overhead": extract_bench.store_overhead(kept)}) or {})
        if want("bucketing_speedup"):
            results.update(step("bucketing_speedup", lambda: extract_bench.bucketing_speedup(plan)) or {})
        if want("scaling_extract"):
            results.update(step("scaling_extract", lambda: extract_bench.scaling_extract(plan, tmp)) or {})
        if want("scaling_extract_workers"):
            results.update(step("scaling_extract_workers", lambda: cluster_bench.scaling_extract_workers(plan, tmp)) or {})
        if want("score_read_fraction") or want("score_peak_rss"):
            got = step("score_read_fraction", lambda: score_bench.score_read_fraction(plan, tmp))
            if got:
                results.update(got[0])
                results.update(step("score_peak_rss", lambda: score_bench.score_peak_rss(plan, got[1])) or {})
        if want("scaling_score"):
            results.update(step("scaling_score", lambda: score_bench.scaling_score(plan, tmp)) or {})
        if any(want(k) for k in ("cached_rerun_seconds", "train_seconds", "fused_heads", "probe_speedup", "train_stage_seconds")):
            got = step("cached_rerun_seconds", lambda: cached_bench.cached_rerun(plan, tmp, cached_store))
            if got:
                results.update(got[0])
                fill = got[0]["cached_rerun_seconds"]["details"]["first_run_seconds"]
                if want("train_seconds"):
                    results.update(step("train_seconds", lambda: train_bench.train_seconds(got[1], got[2], fill)) or {})
                if want("fused_heads"):
                    results.update(step("fused_heads", lambda: train_bench.fused_heads(got[1], got[2], fill, tmp)) or {})
                if want("probe_speedup"):
                    results.update(
                        step("probe_speedup", lambda: train_bench.probe_speedup(plan, *train_bench.probe_config(plan, tmp, got[1], got[2])))
                        or {}
                    )
                if want("train_stage_seconds"):
                    results.update(step("train_stage_seconds", lambda: train_bench.train_stage_seconds(got[1], got[2], tmp)) or {})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["_seconds"] = timings
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmarks of the layer-feature store (ratios against in-process references)."
    )
    p.add_argument("--quick", action="store_true", help="MiniLM and tiny models on SST-2 subsets (< 3 minutes on 2 cores)")
    p.add_argument("--smoke", action="store_true", help="tiny models, a few rows: checks the harness only (the test suite)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(ORDER)}")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"), help="results JSON (default: bench/results.json)")
    p.add_argument("--readme", default=None, help="README to write the table into (default: README.md next to --out)")
    p.add_argument(
        "--cached-store",
        default=None,
        help="full mode: an existing store that already holds configs/default.toml's features (else one is built, slowly)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    for k, v in common.env().items():
        os.environ.setdefault(k, v)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("pipeline", "stages", "store", "transformers", "distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    if args.threads:
        import dataclasses

        plan = dataclasses.replace(plan, threads=args.threads)
    only = {s for s in args.only.split(",") if s} or None
    t0 = time.perf_counter()
    info = common.machine(plan)
    results = run(plan, only, args.cached_store)
    timings = results.pop("_seconds")
    info["load_average_end"] = common._loadavg()
    info["total_seconds"] = round(time.perf_counter() - t0, 1)
    info["seconds_per_benchmark"] = timings
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(sorted(results.items(), key=lambda kv: (_order(kv[0]), kv[0])))
    out.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    (out.parent / "machine.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    from bench.report import write_readme

    readme = Path(args.readme) if args.readme else out.parent / "README.md"
    write_readme(readme, payload, info)
    from bench.report import table

    print(table(payload, info))
    print(f"wrote {out} and {readme} in {info['total_seconds']} s", file=sys.stderr)
    return 0


def _order(name: str) -> int:
    base = name.split("/", 1)[0]
    return ORDER.index(base) if base in ORDER else len(ORDER)


if __name__ == "__main__":
    sys.exit(main())
