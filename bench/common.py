"""Shared pieces: result records, sizes per mode, timing, machine description."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plan:
    """How much work each benchmark does; ``quick`` must stay under 3 minutes on 2 CPU cores."""

    mode: str
    extract_models: tuple[str, ...]  # model sources for extract_overhead
    extract_rows: int  # SST-2 train rows per extract_overhead repetition
    reps: int  # interleaved repetitions (medians)
    bucket_model: str
    bucket_rows: int  # 0 = the whole training split
    scale_model: str
    scale_rows: int  # rows at 1x for scaling_extract
    score_limit_mb: float  # the memory limit the score benchmark pretends Dask has
    score_rows_per_chunk: int
    score_scale_mb: float  # store size at 1x for scaling_score
    cached_config: str  # config whose cached rerun is timed (a path, or "tiny:<limit>" for a cut-down tiny.toml)
    cached_reps: int
    probe_models: tuple[str, ...] = ()  # model sources whose per-layer probes probe_speedup times
    probe_rows: int = 0  # SST-2 rows per split extracted for probe_speedup (0 = read the cached config's store)
    probe_reps: int = 1  # interleaved (scikit-learn, batched) pairs
    threads: int = 0  # torch threads (0 = torch's default)
    workers_limit: int = 600  # rows per split of configs/tiny.toml for scaling_extract_workers (0 = all)
    extract_rows_for: tuple[tuple[str, int], ...] = ()  # (model source, rows) overriding extract_rows for that model


QUICK = Plan(
    "quick",
    ("all-minilm-l6-v2", "smollm2-135m-instruct"),
    96,
    3,
    "all-minilm-l6-v2",
    64,
    "all-minilm-l6-v2",
    24,
    32,
    1024,
    8,
    "configs/tiny.toml",
    3,
    ("all-minilm-l6-v2",),
    1500,
    2,
    extract_rows_for=(("smollm2-135m-instruct", 24),),  # one decoder (llama family) too, on fewer rows
)
FULL = Plan(
    "full",
    ("all-minilm-l6-v2", "smollm2-135m-instruct", "roberta-random-small", "t5-random-small"),
    512,
    5,
    "all-minilm-l6-v2",
    0,
    "all-minilm-l6-v2",
    256,
    256,
    1024,
    64,
    "configs/default.toml",
    5,
    ("all-minilm-l6-v2", "smollm2-135m-instruct"),
    0,
    2,
    workers_limit=0,
)
# The test suite's smoke run: tiny random models, a handful of rows; numbers are meaningless.
SMOKE = Plan(
    "smoke",
    ("tiny-random-bert", "tiny-random-llama"),
    16,
    1,
    "tiny-random-bert",
    32,
    "tiny-random-bert",
    8,
    2,
    256,
    1,
    "tiny:16",
    1,
    ("tiny-random-llama", "tiny-random-bert"),
    0,
    1,
    workers_limit=16,
)


def result(value, reference, unit: str, details: dict | None = None, ratio=None) -> dict:
    """One results.json record; ratio defaults to value / reference."""
    if ratio is None:
        ratio = value / reference if reference else float("nan")
    return {"value": _num(value), "reference": _num(reference), "ratio": _num(ratio), "unit": unit, "details": details or {}}


def _num(x):
    return round(float(x), 6) if isinstance(x, (int, float)) and not isinstance(x, bool) else x


def median(xs) -> float:
    return float(statistics.median(xs))


def scaling_result(times: dict[int, list[float]], details: dict) -> dict:
    """The time at 4x the data against 4 x the time at 1x (1.0 = linear), with the median seconds per size."""
    t1, t4 = median(times[1]), median(times[4])
    seconds = {f"{k}x": round(median(v), 3) for k, v in times.items()}
    return result(t4, 4 * t1, "seconds (4x data vs 4 x time at 1x)", {**details, "seconds": seconds, "goal": "~1.0 (linear)"})


def write_sst2_config(path: Path, name: str, limit: int, models: dict[str, str], sections: str = "") -> Path:
    """A bench config over the first ``limit`` rows of each SST-2 split; ``models`` maps name to source,
    ``sections`` is the TOML of the stage tables."""
    head = f'name = "{name}"\nseed = 0\n\n[data]\nname = "sst2"\npath = "{ROOT / "data" / "sst2"}"\n'
    head += f'splits = ["train", "dev", "test"]\nlimit = {limit}\n\n'
    tables = "".join(f'[[models]]\nname = "{m}"\nsource = "{s}"\n\n' for m, s in models.items())
    path.write_text(head + tables + sections, encoding="utf-8")
    return path


@dataclass
class Timer:
    """Wall and CPU time of a block (CPU time of the whole process: every torch thread)."""

    wall: float = 0.0
    cpu: float = 0.0
    _t: tuple = field(default=(0.0, 0.0), repr=False)

    def __enter__(self) -> Timer:
        self._t = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t[0]
        self.cpu = time.process_time() - self._t[1]


def paired_ratio(ref: list[float], new: list[float]) -> float:
    """Median over repetitions of ref_i / new_i: pairs measured back to back share the machine's load."""
    return median([r / n for r, n in zip(ref, new) if n > 0])


def machine(plan: Plan) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram = float("nan")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "mode": plan.mode,
        "load_average_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def env() -> dict:
    """Environment for subprocesses: offline, embedded models where the project keeps them."""
    e = dict(os.environ)
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.setdefault("TRANSFORMERS_OFFLINE", "1")
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e.setdefault("LAYERSTORE_MODELS", str(ROOT / ".models"))
    return e
