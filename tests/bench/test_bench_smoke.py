"""The benchmark harness runs end to end on tiny models; it reports, it never asserts speed."""

from __future__ import annotations

import json
import math
import os

import pytest

from bench.__main__ import main

KEYS = (
    "extract_overhead",
    "extract_overhead/bert",
    "extract_overhead/llama",
    "bucketing_speedup",
    "store_overhead",
    "scaling_extract",
    "scaling_extract_workers",
    "probe_speedup",
    "train_stage_seconds",
    "score_read_fraction",
    "score_peak_rss",
    "scaling_score",
    "cached_rerun_seconds",
    "train_seconds",
    "head_params",
    "fused_heads",
    "fused_heads/fusion",
    "fused_heads/concat",
)


@pytest.mark.slow
def test_smoke_run_writes_every_result(tmp_path):
    out = tmp_path / "results.json"
    threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    assert main(["--smoke", "--out", str(out)]) == 0
    # the Dask workers' one-thread settings must not leak into the bench's later subprocesses
    assert {k: os.environ.get(k) for k in threads} == threads
    results = json.loads(out.read_text())
    assert set(KEYS) <= set(results), sorted(set(KEYS) - set(results))
    for name, rec in results.items():
        assert set(rec) == {"value", "reference", "ratio", "unit", "details"}, name
        assert rec["unit"] != "error", (name, rec["details"])
        assert isinstance(rec["details"], dict), name
        for field in ("value", "reference", "ratio"):
            assert isinstance(rec[field], (int, float)) and math.isfinite(rec[field]), (name, field, rec[field])
    # fused heads: each fit timed, its parameters against the frozen ones it reads; the real models' figure from shapes
    for head in ("concat", "concat_mlp", "fusion_no_cooc", "fusion", "fusion_nu", "llmembed"):
        rec = results[f"fused_heads/{head}"]
        assert rec["value"] == pytest.approx(rec["details"]["fit_seconds"], abs=1e-3) and rec["value"] > 0, head
        read = sum(rec["details"]["frozen_params"].values())
        assert rec["ratio"] == pytest.approx(rec["details"]["params"] / read, rel=1e-3, abs=1e-6), head
        if head != "concat":  # torch heads: the epochs they ran and what those cost at a matmul's speed
            floor = rec["details"]
            assert floor["epochs_run"] >= 1 and floor["epoch_flop"] > 0 and floor["seconds_at_matmul_peak"] > 0, head
    # where the extract gap is: the hooked forward alone, timed in the same repetitions
    for fam in ("bert", "llama"):
        det = results[f"extract_overhead/{fam}"]["details"]
        assert len(det["features_seconds"]) == len(det["bare_seconds"]) and det["features_only_ratio"] > 0, fam
        assert len(det["read_once_seconds"]) == len(det["bare_seconds"]) and det["read_once_ratio"] > 0, fam
    # score with the shard files dropped from the page cache, next to the warm figure
    det = results["score_read_fraction"]["details"]
    assert len(det["cold_score_seconds"]) == len(det["cold_plain_seconds"]) >= 2
    assert math.isfinite(det["cold_ratio"]) and det["cold_ratio"] > 0
    # and the bounds: hashing alone on one core and on all, score with the hashing left out
    assert len(det["unhashed_score_seconds"]) == len(det["sha256_all_cores_seconds"]) == len(det["score_seconds"])
    assert 0 < det["ratio_if_only_hashing"] and 0 < det["ratio_if_only_hashing_all_cores"] and 0 < det["ratio_without_hashing"]
    shapes = results["fused_heads"]["details"]["heads"]
    assert set(shapes) == {"concat", "concat_mlp", "fusion_no_cooc", "fusion", "fusion_nu", "llmembed"}
    assert results["fused_heads"]["ratio"] == max(h["ratio"] for h in shapes.values()) < 0.04
    readme = (tmp_path / "README.md").read_text()
    assert "| `cached_rerun_seconds` |" in readme and "mode: smoke" in readme
    assert json.loads((tmp_path / "machine.json").read_text())["cores"] >= 1
