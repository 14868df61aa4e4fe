"""`make score` end to end on a tiny real store: every output, and the numbers checked by brute force.

The store is extracted once per session from two tiny random models (llama and t5,
80 rows per split, shard_rows 32, so 3 shards of 32/32/16 rows); see
tests/pipeline_e2e/tiny_pipeline.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "pipeline_e2e"))
import tiny_pipeline as tp  # noqa: E402

from store import Store  # noqa: E402

VARIABILITY_COLUMNS = ["dataset", "split", "model", "pooling", "layer", "variability", "n_rows", "n_classes"]
SPARSITY_COLUMNS = ["dataset", "split", "model", "threshold", "rule", "layer", "n_neurons", "token_fire_fraction", "dead_fraction"]
NEURON_COLUMNS = [
    "dataset",
    "split",
    "model",
    "threshold",
    "layer",
    "neuron",
    "token_fire_rate",
    "sentence_fire_rate",
    "keyword_score",
    "keyword_base_rate",
    "keyword_lift",
    "keyword_p_value",
    "selectivity",
    "top_class",
]
N_THRESHOLDS = {"llama": 2, "t5": 1}  # family defaults: gated |a| > 0.1, 0.5; ReLU a > 0


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(cfg, store, out dir, ScoreResult) of one score run with the threads scheduler."""
    from stages.score.runner import run_score

    cfg_path, store_dir = tp.copy_store(tmp_path_factory, "score_store")
    cfg = tp.load(cfg_path)
    store = Store(str(store_dir))
    out = tmp_path_factory.mktemp("score_out")
    result = run_score(cfg, store, out, scheduler="threads", progress=False)
    return cfg, store, out, result, store_dir


def _entry_arrays(store_dir: Path, key: str, name: str) -> tuple[list[np.ndarray], list[dict], pd.DataFrame]:
    """Per-shard arrays and attrs of ``name`` and the row table, read with h5py/pandas from the shard files."""
    root = store_dir / "entries" / key
    manifest = json.loads((root / "manifest.json").read_text())
    arrays, attrs, tables = [], [], []
    for shard in sorted(manifest["shards"], key=lambda s: s["row_start"]):
        with h5py.File(root / shard["file"], "r") as f:
            arrays.append(f[name][()])
            attrs.append(dict(f[name].attrs))
        tables.append(pd.read_parquet(root / shard["table"]))
    return arrays, attrs, pd.concat(tables, ignore_index=True)


def brute_force_nu(X: np.ndarray, y: np.ndarray) -> float:
    """nu = (1/K) trace(Sigma_W pinv_{K-1}(Sigma_B)) with explicit loops; inf where class means coincide."""
    X = X.astype(np.float64)
    classes = np.unique(y)
    K, d = len(classes), X.shape[1]
    mus = []
    sigma_w = np.zeros((d, d))
    for k in classes:
        rows = X[y == k]
        mu = rows.sum(axis=0) / len(rows)
        mus.append(mu)
        cov = np.zeros((d, d))
        for x in rows:
            cov += np.outer(x - mu, x - mu)
        sigma_w += cov / len(rows)
    sigma_w /= K
    mu_bar = sum(mus) / K
    sigma_b = np.zeros((d, d))
    for mu in mus:
        sigma_b += np.outer(mu - mu_bar, mu - mu_bar)
    sigma_b /= K
    scale = np.sqrt((X**2).sum(axis=1).mean())
    if max(np.abs(mu - mu_bar).max() for mu in mus) <= 1e-9 * scale:
        return float("inf")
    evals, evecs = np.linalg.eigh(sigma_b)
    top = np.argsort(evals)[::-1][: K - 1]
    total = 0.0
    for j in top:
        v = evecs[:, j]
        total += v @ sigma_w @ v / evals[j]
    return float(total / K)


def _request(cfg, model: str):
    from pipeline.data import load_split
    from stages.entries import feature_requests

    split = load_split(cfg.data, cfg.score.split)
    return next(r for r in feature_requests(cfg, splits={split.name: split}) if r.model.name == model)


def test_score_writes_every_output_with_documented_columns(scored):
    cfg, store, out, result, store_dir = scored
    for name in ("variability.parquet", "sparsity.parquet", "neurons.parquet", "variability.png", "sparsity.png", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    var = pd.read_parquet(out / "variability.parquet")
    spa = pd.read_parquet(out / "sparsity.parquet")
    neu = pd.read_parquet(out / "neurons.parquet")
    assert set(VARIABILITY_COLUMNS) <= set(var.columns)
    assert set(SPARSITY_COLUMNS) <= set(spa.columns)
    assert set(NEURON_COLUMNS) <= set(neu.columns)
    n_layers = 2  # tiny models: 2 blocks -> hidden states 0..2, FFN layers 0..1
    assert len(var) == 2 * 3 * (n_layers + 1)
    assert set(var["model"]) == {"llama", "t5"} and set(var["pooling"]) == {"mean", "first", "last"}
    assert (var["n_rows"] == 80).all() and (var["n_classes"] == 2).all()
    assert (var[["dataset", "split"]] == ["sst2", "train"]).all().all()
    assert len(spa) == 3 * n_layers and (spa["n_neurons"] == 64).all()
    assert len(neu) == 3 * n_layers * 64
    assert set(zip(spa["model"], spa["rule"], spa["threshold"])) == {("llama", "abs_gt", 0.1), ("llama", "abs_gt", 0.5), ("t5", "gt", 0.0)}
    assert not var[var["lowest"]]["layer"].eq(0).any()  # selection among block outputs by default
    assert var["norm_ratio_median"].ge(1).all()
    assert neu["token_fire_rate"].between(0, 1).all() and neu["sentence_fire_rate"].between(0, 1).all()
    pd.testing.assert_frame_equal(var, result.variability)
    for name in ("variability.png", "sparsity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "Random weights" in report and "llama (tiny-random-llama)" in report and "t5 (tiny-random-t5)" in report
    assert "![variability](variability.png)" in report and "![sparsity](sparsity.png)" in report
    assert "| \\|a\\| > t |" in report  # the rule, escaped inside a markdown table cell
    for text in ("keyword_lift", "keyword_p_value", "Base rate", "Attention sinks", "block outputs 1..L"):
        assert text in report, text


def test_score_is_recorded_in_store(scored):
    from stages.entries import load_scores

    cfg, store, out, result, store_dir = scored
    assert store.exists(result.key)
    pd.testing.assert_frame_equal(load_scores(store, result.key), pd.read_parquet(out / "variability.parquet"))


@pytest.mark.parametrize("model", ["llama", "t5"])
def test_variability_equals_brute_force_from_shard_files(scored, model):
    cfg, store, out, result, store_dir = scored
    req = _request(cfg, model)
    var = result.variability
    checked_inf = 0
    for pooling in ("mean", "first", "last"):
        shards, _, table = _entry_arrays(store_dir, req.key, f"hidden/{pooling}")
        X = np.concatenate(shards)
        assert X.shape[0] == len(table) == 80
        y = table["label"].to_numpy()
        for layer in range(X.shape[1]):
            got = var[(var["model"] == model) & (var["pooling"] == pooling) & (var["layer"] == layer)]["variability"].item()
            want = brute_force_nu(X[:, layer, :], y)
            if np.isinf(want):
                checked_inf += 1
                assert got == np.inf, (pooling, layer, got)
            else:
                assert np.isfinite(got) and abs(got - want) / want < 1e-6, (pooling, layer, got, want)
    if model == "llama":
        # the first token of every llama row is BOS, and causal attention makes its state row-independent
        assert (var[(var["model"] == "llama") & (var["pooling"] == "first")]["variability"] == np.inf).all()
        assert checked_inf >= 3


@pytest.mark.parametrize("model", ["llama", "t5"])
def test_sparsity_equals_sums_of_stored_fire_counts(scored, model):
    cfg, store, out, result, store_dir = scored
    req = _request(cfg, model)
    counts, attrs, _ = _entry_arrays(store_dir, req.key, "ffn/fire_count")
    totals = np.sum(counts, axis=0)  # (n_thresholds, n_layers, ffn)
    assert totals.shape[0] == N_THRESHOLDS[model] and list(attrs[0]["thresholds"]) == list(req.thresholds)
    n_tokens = sum(int(a["n_tokens"]) for a in attrs)
    for t, total in zip(req.thresholds, totals):
        spa = result.sparsity[(result.sparsity["model"] == model) & (result.sparsity["threshold"] == t)].sort_values("layer")
        np.testing.assert_allclose(spa["token_fire_fraction"], total.sum(axis=1) / (n_tokens * total.shape[1]), rtol=1e-12)
        np.testing.assert_allclose(spa["dead_fraction"], (total == 0).mean(axis=1), rtol=0, atol=0)
        neu = result.neurons[(result.neurons["model"] == model) & (result.neurons["threshold"] == t)].sort_values(["layer", "neuron"])
        np.testing.assert_allclose(neu["token_fire_rate"], (total / n_tokens).ravel(), rtol=1e-12)
    if model == "llama":  # a higher magnitude threshold never fires more
        assert (totals[1] <= totals[0]).all()


def test_synchronous_scheduler_gives_identical_tables(scored, tmp_path):
    from stages.score.runner import run_score

    cfg, store, out, result, store_dir = scored
    sync = run_score(cfg, store, tmp_path, scheduler="synchronous", progress=False)
    for a, b in ((result.variability, sync.variability), (result.sparsity, sync.sparsity), (result.neurons, sync.neurons)):
        pd.testing.assert_frame_equal(a, b)
    assert sync.key == result.key


def test_missing_features_error_says_run_extract(tmp_path):
    from pipeline.errors import PipelineError
    from stages.score.runner import run_score

    cfg = tp.load(tp.write_config(tmp_path))
    with pytest.raises(PipelineError, match=r"no features for sst2/train/llama.*make extract CONFIG=.*tiny\.toml"):
        run_score(cfg, Store(str(tmp_path / "empty")), tmp_path / "out", progress=False)


@pytest.mark.slow
def test_distributed_cluster_gives_identical_tables(scored, tmp_path):
    distributed = pytest.importorskip("distributed")
    from stages.score.runner import run_score

    cfg, store, out, result, store_dir = scored
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0") as cluster:
        remote = run_score(cfg, store, tmp_path, scheduler=cluster.scheduler_address, progress=False)
    for a, b in ((result.variability, remote.variability), (result.sparsity, remote.sparsity), (result.neurons, remote.neurons)):
        pd.testing.assert_frame_equal(a, b)


def test_keyword_section_states_the_length_confound_with_measured_lengths(scored):
    """Keyword sentences are longer, so they fire more neurons by chance; the report says by how much, from the texts."""
    from stages.entries import load_keywords
    from stages.score.sparsity import keyword_mask

    cfg, store, out, result, store_dir = scored
    texts = list(_request(cfg, "llama").split.texts)
    has = keyword_mask(texts, load_keywords(cfg.score.keywords))
    assert 0 < has.sum() < len(texts)
    words = np.array([len(t.split()) for t in texts])
    report = (out / "report.md").read_text()
    assert (
        f"here sentences with a keyword average {words[has].mean():.1f} words, the others {words[~has].mean():.1f}. "
        "The random-weight models (llama (tiny-random-llama), t5 (tiny-random-t5)) are a negative control: each of their "
        "neurons that survives does so without learned meaning" in report
    )
