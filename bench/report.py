"""The human-readable side: a Markdown table of results.json and the bench/README.md around it."""

from __future__ import annotations

import math
from pathlib import Path

# key prefix -> (goal text, test on the record) ; None = informational
GOALS = {
    "extract_overhead": ("ratio >= 0.95", lambda r: r["ratio"] >= 0.95),
    "bucketing_speedup": ("ratio >= 3.5", lambda r: r["ratio"] >= 3.5),
    "store_overhead": ("value <= 0.05", lambda r: r["value"] <= 0.05),
    "scaling_extract": ("ratio ~ 1 (0.8-1.25)", lambda r: 0.8 <= r["ratio"] <= 1.25),
    "scaling_extract_workers": ("ratio > 1 (at most 2 on 2 cores)", lambda r: r["ratio"] > 1.0),
    "score_read_fraction": ("ratio >= 0.5", lambda r: r["ratio"] >= 0.5),
    "score_peak_rss": ("value <= memory limit", lambda r: bool(r["details"].get("within_limit"))),
    "scaling_score": ("ratio ~ 1 (0.8-1.25)", lambda r: 0.8 <= r["ratio"] <= 1.25),
    "cached_rerun_seconds": ("value < 2 s", lambda r: r["value"] < 2.0),
    "train_seconds": ("informational", None),
    "head_params": ("ratio <= 0.04 (LLMEmbed: ~4%)", lambda r: r["ratio"] <= 0.04),
    "fused_heads": ("ratio <= 0.04 (LLMEmbed: ~4%)", lambda r: r["ratio"] <= 0.04),
    # fits on the bench config's models (quick: tiny random ones): the ratio is not LLMEmbed's comparison
    "fused_heads/*": ("informational", None),
    "probe_speedup": ("ratio >= 10", lambda r: r["ratio"] >= 10),
    "train_stage_seconds": ("value < 60 s (default config)", lambda r: r["value"] < 60.0),
}


def _fmt(x) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3g}"
        return f"{x:.3f}" if abs(x) < 100 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _goal(name: str):
    """The goal of a record: ``prefix/*`` for suffixed names where there is one, else the prefix's."""
    prefix = name.split("/", 1)[0]
    return GOALS.get(f"{prefix}/*" if "/" in name and f"{prefix}/*" in GOALS else prefix)


def status(name: str, rec: dict) -> str:
    goal = _goal(name)
    if rec.get("unit") == "error":
        return "error: " + rec["details"].get("error", "")[:80]
    if goal is None or goal[1] is None:
        return "-"
    try:
        return "met" if goal[1](rec) else "**missed**"
    except (KeyError, TypeError):
        return "?"


def table(results: dict, info: dict) -> str:
    lines = [
        f"mode: {info['mode']}, {info['date']}, {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, "
        f"torch {info['torch']} ({info['torch_threads']} threads), transformers {info['transformers']}, "
        f"load average {info.get('load_average_start')} -> {info.get('load_average_end')}",
        *([""] if info.get("reruns") else []),
        *(
            f"- re-measured in a later run of the same mode: {', '.join(f'`{b}`' for b in r['benchmarks'])} "
            f"({r['date']}, load average {r['load_average_start']} -> {r['load_average_end']}): {r['why']}"
            for r in info.get("reruns", [])
        ),
        "",
        "| benchmark | value | reference | ratio | unit | goal | status |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for name, r in results.items():
        goal = (_goal(name) or ("", None))[0]
        lines.append(
            f"| `{name}` | {_fmt(r['value'])} | {_fmt(r['reference'])} | {_fmt(r['ratio'])} | {r['unit']} | {goal} | {status(name, r)} |"
        )
    return "\n".join(lines)


INTRO = """# Benchmarks

`make bench` (or `.venv/bin/python -m bench`) runs the full set: all four embedded models, the
whole SST-2 training split; it takes long on a CPU. `make bench QUICK=1` (`python -m bench --quick`)
uses all-MiniLM-L6-v2 (and SmolLM2-135M on 24 rows for `extract_overhead/llama`), the tiny random models and SST-2 subsets and finishes in about 3 minutes on
2 cores. Both write `bench/results.json` (one object: name -> {value, reference, ratio, unit,
details}), `bench/machine.json` and this file. `--only a,b` runs a subset; `--cached-store PATH`
(full mode) reuses a store that already holds `configs/default.toml`'s features.

The machines this runs on are shared, so absolute times are noisy. What is published is a
**ratio against a reference measured in the same process**, repetitions interleaved (reference,
candidate, reference, candidate, ...) and summarised by the median of per-pair ratios. The test
suite never asserts speed; `tests/bench/test_bench_smoke.py` only checks that the harness runs.

| benchmark | what is measured | reference |
|---|---|---|
| `extract_overhead[/family]` | tokens/s of `extract_entry` (tokenise, length-grouped batches, every hook, poolings, firing counts, fp16, writer thread, commit to a temporary store); details hold `features_only_ratio` (the forward with every hook and pooling, nothing else) | tokens/s of bare `model(**batch)` on the same padded batches, same dtype, `inference_mode`; the unsuffixed key is the worst model |
| `bucketing_speedup` | real tokens/s with length-grouped token-budget batches (all-MiniLM-L6-v2, SST-2 train) | fixed batches of 32 padded to 128 tokens, as LLMEmbed's reference code; same hooks and poolings |
| `store_overhead` | bytes on disk of an extract entry (HDF5 shards, row tables, manifest) / raw bytes of its arrays - 1 | goal 0.05 |
| `scaling_extract`, `scaling_score` | time at 4x the data | 4 x time at 1x (ratio 1 = linear) |
| `scaling_extract_workers` | `extract --scheduler` of configs/tiny.toml on a local Dask cluster with 2 worker processes (1 thread each) | the same with 1 worker; ratio = speed-up (at most 2 on 2 cores) |
| `score_read_fraction` | effective MiB/s of score (variability for every pooling + sparsity, Dask threads, and the sha256 of every shard byte, which score checks as it reads) over a synthetic entry of MiniLM shapes, >= 3x the memory limit; details hold `sha256_seconds`, `ratio_if_only_hashing` (the ceiling a whole-file hash leaves on this CPU) and `cold_ratio` (both runs with the files dropped from the page cache first, as for a store larger than memory) | plain sequential h5py read of every dataset of the same shard files |
| `score_peak_rss` | peak RSS increase of that score run in a subprocess (baseline after the imports, dask, distributed and scipy.special included, and the row table) | threads x largest chunk + accumulators; status checks it stays below the memory limit |
| `cached_rerun_seconds` | wall time of `python -m pipeline extract` with everything cached (subprocess) | goal 2 s |
| `train_seconds`, `head_params` | fitting a probe and the fusion head on cached features; fusion head parameters | extract time of those features; frozen parameters of the models the head reads |
| `fused_heads[/head]` | `/head`: each fused head of the train stage (concat, concat_mlp, fusion_no_cooc, fusion, fusion_nu, llmembed) fitted on the cached config's features, fit seconds; details: params, frozen params read, dev/test accuracy. Unsuffixed: the largest-ratio fused head's parameters for `configs/default.toml`'s real models, from shapes | `/head`: extracting the features; ratio = head params / frozen params of the models it reads. Unsuffixed: frozen parameters of the models that head reads (LLMEmbed: ~4%) |
| `probe_speedup[/family]` | the train stage's per-layer probe sweep (`probe_layers`: every layer, mean pooling, every `C`, dev selection, dev and test scoring) with the batched torch solver; full mode: SmolLM2 and MiniLM on the whole SST-2 train split, quick: MiniLM on 1500 rows per split | the same sweep with scikit-learn's lbfgs (`solver="sklearn"`) on the same features; the unsuffixed key is the worst model; details hold the accuracy and chosen-`C` agreement |
| `train_stage_seconds` | wall time of `python -m pipeline train` (what `make train` runs: every probe, the fusion and concat heads, the store entry) in a subprocess, on the cached-rerun config (full: `configs/default.toml`) | goal 60 s |

Details of every record (per-repetition times, sizes, CPU-time ratios, profiles) are in
`results.json`.

## Latest results

"""


def _bounds(name: str, r: dict, results: dict) -> str | None:
    """What the record's details (and the records it names) measured about the gap to its goal, or None."""
    d = r.get("details", {})
    prefix = name.split("/", 1)[0]
    if prefix == "extract_overhead" and "features_only_ratio" in d:
        said = (
            f"the hooked forward alone (every hook and pooling, no tokenising, host copy or write) keeps "
            f"{_fmt(d['features_only_ratio'])} of a bare forward; the whole extract {_fmt(r['ratio'])}"
        )
        if "read_once_ratio" in d:
            said += f"; hooks that only read each FFN activation once (one fused pass, nothing else) keep {_fmt(d['read_once_ratio'])}"
        return said
    if prefix == "score_read_fraction" and "ratio_if_only_hashing" in d:
        cold = d.get("cold_ratio")
        said = f"a score that did nothing but hash every shard byte would reach {_fmt(d['ratio_if_only_hashing'])}"
        if "ratio_if_only_hashing_all_cores" in d:
            said += f" ({_fmt(d['ratio_if_only_hashing_all_cores'])} with every core hashing a shard at once)"
        if "ratio_without_hashing" in d:
            said += f"; score with the hashing left out reaches {_fmt(d['ratio_without_hashing'])}"
        return said + (f"; with the files dropped from the page cache first, score reaches {_fmt(cold)}" if cold is not None else "")
    if prefix == "train_stage_seconds" and d.get("fit_seconds_by_head"):
        heads = d["fit_seconds_by_head"]
        slow = max(heads, key=heads.get)
        said = f"the slowest head, `{slow}`, took {_fmt(float(heads[slow]))} s of the {_fmt(r['value'])} s"
        floor = results.get(f"fused_heads/{slow}", {}).get("details", {})
        if "seconds_at_matmul_peak" in floor:
            said += (
                f"; its {floor['epochs_run']} epochs of {_fmt(floor['epoch_flop'] / 1e9)} GFLOP would take {_fmt(floor['seconds_at_matmul_peak'])} s "
                f"even at the {_fmt(floor['matmul_gflops'])} GFLOP/s of a large float32 matmul on these cores (`fused_heads/{slow}`)"
            )
        return said
    return None


def gaps(results: dict) -> str:
    """One line per missed goal with the figures that bound it, measured in the same run."""
    lines = [
        f"- `{name}`: {said}." for name, r in results.items() if status(name, r) == "**missed**" and (said := _bounds(name, r, results))
    ]
    return "\n".join(["", "### Where the missed goals stand", "", *lines, ""]) if lines else ""


def write_readme(path: Path, results: dict, info: dict) -> None:
    path.write_text(INTRO + table(results, info) + "\n" + gaps(results), encoding="utf-8")
