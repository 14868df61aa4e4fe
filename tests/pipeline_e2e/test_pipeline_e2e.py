"""The three stages chained on tiny random models: CLI, store contents and lineage.

The non-slow tests reuse the session's tiny store (extract -> score -> train in process);
the slow one runs the real CLI in subprocesses from a clean store, then `predict`.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import tiny_pipeline as tp
from config_factory import ROOT

from store import Store


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg_path, store_dir, out = tp.trained_store(tmp_path_factory)
    return tp.load(cfg_path), store_dir, out


def test_report_has_score_and_train_sections(trained):
    cfg, store_dir, out = trained
    report = (out / "report.md").read_text()
    assert report.startswith("# e2e-tiny: scores on sst2/train")
    assert (
        report.index("## Hidden-state variability")
        < report.index("## FFN activation sparsity")
        < report.index("## Train: heads on cached features")
    )
    assert report.count("Random weights") == 2  # flagged in both the score and the train section
    for name in (
        "variability.parquet",
        "sparsity.parquet",
        "neurons.parquet",
        "variability.png",
        "sparsity.png",
        "train.parquet",
        "layers.parquet",
        "selection.parquet",
        "layers.png",
    ):
        assert (out / name).is_file(), name


def test_heads_entry_lineage_points_at_features_and_scores(trained):
    from stages.entries import feature_requests, heads_key
    from stages.predict import heads_entry

    cfg, store_dir, out = trained
    store = Store(str(store_dir))
    entry = heads_entry(cfg, store)
    lineage = json.loads(entry.read_file("lineage.json"))
    assert heads_key(lineage) == entry.key
    assert lineage["features"] == {f"{r.model.name}/{r.split.name}": r.key for r in feature_requests(cfg)}
    assert store.exists(lineage["scores"])
    assert lineage["config"]["train"]["fusion"]["inputs"] == list(cfg.train.fusion.inputs)
    stored = pd.read_parquet(io.BytesIO(entry.read_file("train.parquet")))
    pd.testing.assert_frame_equal(stored, pd.read_parquet(out / "train.parquet"))
    assert not store.verify()  # every entry, features, scores and heads, rehashes clean
    kinds = sorted(e.description.get("kind") for e in store.find())
    assert kinds == ["features"] * 6 + ["heads", "scores"]


def test_llama_first_pooling_has_no_selected_head(trained):
    """llama 'first' = BOS on every row: nu is inf at every layer, so no layer is selected, only top."""
    cfg, store_dir, out = trained
    sel = pd.read_parquet(out / "selection.parquet").set_index(["model", "pooling"])
    assert sel.loc[("llama", "first"), "selected_layer"] == -1
    train = pd.read_parquet(out / "train.parquet")
    llama_first = train[(train["models"] == "llama") & (train["pooling"] == "first")]
    assert "selected" not in set(llama_first["head"]) and "top" in set(llama_first["head"])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_run_then_predict_from_a_clean_store(tmp_path):
    cfg_path = tp.write_config(tmp_path, rows=48)
    store, out = tmp_path / "store", tmp_path / "out"
    first = _cli("run", "--config", str(cfg_path), "--store", str(store), "--out", str(out), "-q", cwd=ROOT)
    assert first.returncode == 0, first.stderr
    for name in ("variability.parquet", "sparsity.parquet", "neurons.parquet", "train.parquet", "layers.png", "report.md"):
        assert (out / name).is_file(), name
    again = _cli("run", "--config", str(cfg_path), "--store", str(store), "--out", str(tmp_path / "out2"), cwd=ROOT)
    assert again.returncode == 0, again.stderr
    assert "all 6 entries are cached" in again.stderr + again.stdout
    a = pd.read_parquet(out / "train.parquet").drop(columns="fit_seconds")
    b = pd.read_parquet(tmp_path / "out2" / "train.parquet").drop(columns="fit_seconds")
    pd.testing.assert_frame_equal(a, b)
    pred = _cli(
        "predict", "--config", str(cfg_path), "--store", str(store), "--head", "fusion", "-q", "a great movie", "a dull movie", cwd=ROOT
    )
    assert pred.returncode == 0, pred.stderr
    header, *lines = pred.stdout.strip().splitlines()
    assert header.split("\t")[-1] == "text" and header.split("\t")[0] == "label"
    assert [line.split("\t")[-1] for line in lines] == ["a great movie", "a dull movie"]
    nope = _cli("predict", "--config", str(cfg_path), "--store", str(store), "--head", "nope", "-q", "x", cwd=ROOT)
    assert nope.returncode == 1 and "available:" in nope.stderr and "fusion" in nope.stderr
