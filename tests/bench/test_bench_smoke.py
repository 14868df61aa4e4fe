"""The benchmark harness runs end to end on tiny models; it reports, it never asserts speed."""

from __future__ import annotations

import json
import math

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
)


@pytest.mark.slow
def test_smoke_run_writes_every_result(tmp_path):
    out = tmp_path / "results.json"
    assert main(["--smoke", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(KEYS) <= set(results), sorted(set(KEYS) - set(results))
    for name, rec in results.items():
        assert set(rec) == {"value", "reference", "ratio", "unit", "details"}, name
        assert rec["unit"] != "error", (name, rec["details"])
        assert isinstance(rec["details"], dict), name
        for field in ("value", "reference", "ratio"):
            assert isinstance(rec[field], (int, float)) and math.isfinite(rec[field]), (name, field, rec[field])
    readme = (tmp_path / "README.md").read_text()
    assert "| `cached_rerun_seconds` |" in readme and "mode: smoke" in readme
    assert json.loads((tmp_path / "machine.json").read_text())["cores"] >= 1
