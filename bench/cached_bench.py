"""cached_rerun_seconds: `python -m pipeline extract` when every entry is already in the store."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT, Plan, env, median, result, write_sst2_config

GOAL_SECONDS = 2.0


def config_path(plan: Plan, tmp: Path) -> Path:
    """The config to time; "tiny:N" is configs/tiny.toml cut to N rows per split (the smoke test)."""
    if not plan.cached_config.startswith("tiny:"):
        return ROOT / plan.cached_config
    limit = int(plan.cached_config.split(":", 1)[1])
    models = {"llama": "tiny-random-llama", "bert": "tiny-random-bert"}
    return write_sst2_config(tmp / "bench-tiny.toml", "bench-smoke", limit, models, SMOKE_SECTIONS)


# configs/tiny.toml cut down for the smoke test: two tiny models, a few rows, a 2-epoch head.
SMOKE_SECTIONS = """[extract]
max_length = 64
shard_rows = 64

[train]
Cs = [1.0]

[train.fusion]
inputs = ["llama:-1:mean", "llama:-2:mean", "bert:-1:first"]
average = ["llama:-1:mean", "llama:-2:mean"]
width = 8
hidden = 8
epochs = 2

[train.llmembed]
epochs = 2
"""


def fill(cfg_path: Path, store: str) -> float:
    """Extract everything the config asks for (in this process, so torch is imported once)."""
    import time

    from pipeline import orchestrate
    from pipeline.config import load_config

    t0 = time.perf_counter()
    orchestrate.extract(load_config(cfg_path), store, progress=False)
    return time.perf_counter() - t0


def _cmd(cfg_path: Path, store: str, *extra: str) -> list[str]:
    return [sys.executable, *extra, "-m", "pipeline", "extract", "--config", str(cfg_path), "--store", store, "-q"]


def cached_rerun(plan: Plan, tmp: Path, store: str | None = None) -> tuple[dict, Path, str]:
    import time

    cfg_path = config_path(plan, tmp)
    store = store or str(tmp / "cached-store")
    fill_seconds = fill(cfg_path, store)
    times = []
    for _ in range(plan.cached_reps):
        t0 = time.perf_counter()
        out = subprocess.run(_cmd(cfg_path, store), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
        times.append(time.perf_counter() - t0)
        if out.returncode:
            raise RuntimeError(f"cached rerun failed: {out.stderr[-2000:]}")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], env=env(), cwd=ROOT, check=True)
    interpreter = time.perf_counter() - t0
    details = {
        "config": str(cfg_path.relative_to(ROOT)) if cfg_path.is_relative_to(ROOT) else plan.cached_config,
        "store": "temporary" if store.startswith(str(tmp)) else store,
        "first_run_seconds": round(fill_seconds, 1),
        "seconds": [round(x, 3) for x in times],
        "bare_interpreter_seconds": round(interpreter, 3),
        "goal": f"< {GOAL_SECONDS} s",
    }
    if plan.mode != "smoke":
        details["top_imports"] = top_imports(cfg_path, store)
    return {"cached_rerun_seconds": result(median(times), GOAL_SECONDS, "seconds (wall, subprocess)", details)}, cfg_path, store


def top_imports(cfg_path: Path, store: str, n: int = 6) -> dict:
    """Largest cumulative top-level imports of one cached rerun (`python -X importtime`), in ms."""
    out = subprocess.run(_cmd(cfg_path, store, "-X", "importtime"), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    rows = []
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)", line)
        if m and len(m[2]) <= 1:  # top-level and first-level imports
            rows.append((int(m[1]), m[3]))
    return {name: round(us / 1000) for us, name in sorted(rows, reverse=True)[:n]}
