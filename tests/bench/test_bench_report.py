"""The README's account of missed goals quotes the figures the run measured, and only for missed goals."""

from __future__ import annotations

from bench.report import gaps, write_readme


def _rec(value, reference, ratio, details):
    return {"value": value, "reference": reference, "ratio": ratio, "unit": "x", "details": details}


RESULTS = {
    "extract_overhead/llama": _rec(60.0, 75.0, 0.8, {"features_only_ratio": 0.87, "read_once_ratio": 0.96}),
    "extract_overhead/bert": _rec(98.0, 100.0, 0.98, {"features_only_ratio": 0.99}),
    "score_read_fraction": _rec(
        400.0,
        4000.0,
        0.1,
        {"ratio_if_only_hashing": 0.21, "ratio_if_only_hashing_all_cores": 0.4, "ratio_without_hashing": 0.22, "cold_ratio": 0.26},
    ),
    "train_stage_seconds": _rec(260.0, 60.0, 4.33, {"fit_seconds_by_head": {"probe": 45.0, "llmembed": 137.4, "fusion": 4.5}}),
    "probe_speedup": _rec(70.0, 5.0, 14.0, {}),
    "fused_heads/llmembed": _rec(
        137.4, 600.0, 0.01, {"epochs_run": 128, "epoch_flop": 147e9, "matmul_gflops": 300.0, "seconds_at_matmul_peak": 62.72}
    ),
}


def test_gaps_quote_the_measured_bounds_of_missed_goals_only():
    text = gaps(RESULTS)
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert [line.split("`")[1] for line in lines] == ["extract_overhead/llama", "score_read_fraction", "train_stage_seconds"]
    assert "keeps 0.870 of a bare forward; the whole extract 0.800" in lines[0]
    assert "read each FFN activation once (one fused pass, nothing else) keep 0.960" in lines[0]
    assert "hash every shard byte would reach 0.210 (0.400 with every core hashing a shard at once)" in lines[1]
    assert "with the hashing left out reaches 0.220" in lines[1] and "score reaches 0.260" in lines[1]
    assert "`llmembed`, took 137 s of the 260 s" in lines[2]
    assert "its 128 epochs of 147 GFLOP would take 62.720 s even at the 300 GFLOP/s of a large float32 matmul" in lines[2]


def test_no_section_when_every_goal_is_met(tmp_path):
    met = {k: v for k, v in RESULTS.items() if k in ("extract_overhead/bert", "probe_speedup")}
    assert gaps(met) == ""
    write_readme(
        tmp_path / "README.md",
        RESULTS,
        {"mode": "quick", "date": "d", "cpu": "c", "cores": 2, "ram_gib": 1, "torch": "t", "torch_threads": 2, "transformers": "x"},
    )
    readme = (tmp_path / "README.md").read_text()
    assert readme.index("| `train_stage_seconds` |") < readme.index("### Where the missed goals stand")


def test_readme_names_records_measured_in_a_later_run(tmp_path):
    info = {"mode": "full", "date": "d", "cpu": "c", "cores": 2, "ram_gib": 1, "torch": "t", "torch_threads": 2, "transformers": "x"}
    info["reruns"] = [
        {
            "benchmarks": ["train_stage_seconds"],
            "date": "d2",
            "load_average_start": [0.5],
            "load_average_end": [0.7],
            "why": "a slow machine",
        },
        {"benchmarks": ["extract_overhead"], "date": "d3", "load_average_start": [0.9], "load_average_end": [1.1], "why": "new code"},
    ]
    write_readme(tmp_path / "README.md", RESULTS, info)
    text = (tmp_path / "README.md").read_text()
    assert (
        "\n\n- re-measured in a later run of the same mode: `train_stage_seconds` (d2, load average [0.5] -> [0.7]): a slow machine" in text
    )
    assert "`extract_overhead` (d3, load average [0.9] -> [1.1]): new code" in text
