"""`make train` at runner level on a synthetic store with a known answer.

The feature entries are written through ``store.Store.writer`` under the very keys and
descriptions that extract would use for the config (FeatureRequest.key / description), so
``run_score`` and ``run_train`` read them exactly as they read real ones. Model ``alpha``
has 4 blocks (hidden states 0..4): layer 2 is linearly separable (class means 10 noise
standard deviations apart); the other layers carry a weak or no signal, with the top layer
pure noise. Model ``beta`` is noise everywhere.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import config_factory
import numpy as np
import pandas as pd
import pytest
import torch
from config_factory import KEYWORDS
from scipy import stats

from pipeline.config import load_config
from pipeline.errors import ConfigError, PipelineError
from store import Store

SPLIT_ROWS = {"train": 240, "dev": 160, "test": 240}
SHARD_ROWS = 64
# signal amplitude per hidden-state layer: class means at +-a along one direction, unit noise
ALPHA_AMPLITUDE = [0.3, 1.2, 5.0, 0.6, 0.0]
# delta: the best layer on test (2) is not the best on dev (1), and the embedding output (0) separates best of all
DELTA_AMPLITUDE = {"train": [6.0, 3.0, 1.0, 0.0], "dev": [6.0, 3.0, 1.0, 0.0], "test": [6.0, 0.0, 3.0, 0.0]}
MODELS = {
    "alpha": dict(source="tiny-random-bert", n_layers=4, hidden=16, ffn=8, amplitude=ALPHA_AMPLITUDE),
    "beta": dict(source="tiny-random-roberta", n_layers=3, hidden=12, ffn=8, amplitude=[0.0] * 4),
    "delta": dict(source="tiny-random-llama", n_layers=3, hidden=16, ffn=8, amplitude=DELTA_AMPLITUDE),
}


def write_config(
    folder: Path, *, models=("alpha", "beta"), fusion_inputs=("alpha:-1:mean", "beta:-1:mean"), extra_models: dict | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    if not data.exists():
        data.mkdir()
        for i, (split, n) in enumerate(SPLIT_ROWS.items()):
            labels = np.random.default_rng(10 + i).permutation(np.arange(n) % 2)
            lines = ["text\tlabel"] + [
                f"{split} sentence number {j} about physics\t{y}" if j % 5 == 0 else f"{split} sentence number {j}\t{y}"
                for j, y in enumerate(labels)
            ]
            (data / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sources = {**{m: MODELS[m]["source"] for m in models}, **(extra_models or {})}
    cfg = {
        "name": "synthetic",
        "seed": 0,
        "data": {"name": "synth", "path": str(data), "splits": ["train", "dev", "test"]},
        "models": [{"name": m, "source": s} for m, s in sources.items()],
        "extract": {"poolings": ["mean"], "shard_rows": SHARD_ROWS},
        "score": {"keywords": str(KEYWORDS), "rows_per_chunk": 50},
        "train": {
            "poolings": ["mean"],
            "Cs": [0.1, 1.0],
            "fusion": {
                "inputs": list(fusion_inputs),
                "average": [],
                "nu_layers": 2,
                "width": 8,
                "hidden": 8,
                "epochs": 8,
                "patience": 3,
            },
        },
    }
    return config_factory.write_config(folder / "synthetic.toml", cfg)


def synthetic_features(model: str, split: str, labels: np.ndarray) -> dict[str, np.ndarray]:
    m = MODELS[model]
    n, L, d, f = len(labels), m["n_layers"], m["hidden"], m["ffn"]
    direction = np.random.default_rng(7).normal(size=d)
    direction /= np.linalg.norm(direction)
    rng = np.random.default_rng([ord(c) for c in model + split])
    sign = (2.0 * labels - 1.0)[:, None]
    amplitude = m["amplitude"][split] if isinstance(m["amplitude"], dict) else m["amplitude"]
    hidden = np.stack([rng.normal(size=(n, d)) + a * sign * direction for a in amplitude], axis=1)
    ffn = np.maximum(rng.normal(size=(n, L, f)), 0.0)
    return {"hidden/mean": hidden.astype(np.float16), "ffn/mean": (ffn / 2).astype(np.float16), "ffn/max": ffn.astype(np.float16)}


def write_synthetic_store(cfg, store: Store) -> None:
    """One committed entry per (model, split), keyed exactly as extract would key it."""
    from stages.entries import feature_requests

    for r in feature_requests(cfg):
        m = MODELS[r.model.name]
        desc = {**r.description(), "n_layers": m["n_layers"], "hidden_size": m["hidden"], "ffn_size": m["ffn"]}
        labels = np.asarray(r.split.labels, dtype=np.int64)
        arrays = synthetic_features(r.model.name, r.split.name, labels)
        n_shards = -(-len(labels) // SHARD_ROWS)
        writer = store.writer(r.key, desc, n_shards=n_shards)
        for k in range(n_shards):
            lo, hi = k * SHARD_ROWS, min((k + 1) * SHARD_ROWS, len(labels))
            n_tokens = np.full(hi - lo, 6, dtype=np.int64)
            fire = (arrays["ffn/max"][lo:hi] > 0).sum(axis=0).astype(np.int64) * 3  # (n_layers, ffn)
            table = pd.DataFrame(
                {
                    "row": np.arange(lo, hi, dtype=np.int64),
                    "label": labels[lo:hi],
                    "text": list(r.split.texts[lo:hi]),
                    "n_tokens": n_tokens,
                    "truncated": np.zeros(hi - lo, dtype=bool),
                }
            )
            writer.write_shard(
                k,
                {**{name: a[lo:hi] for name, a in arrays.items()}, "ffn/fire_count": fire},
                table,
                row_start=lo,
                attrs={"ffn/fire_count": {"threshold": 0.0, "n_tokens": int(n_tokens.sum()), "special_tokens_counted": False}},
            )
        writer.commit(expected_shards=n_shards)


class Captured:
    """The in-memory heads run_train serialises, keyed by stored file stem."""

    def __init__(self):
        self.probes: list = []
        self.fused: dict[str, object] = {}
        self.by_class: dict[str, list] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic store -> run_score -> run_train, with the in-memory heads captured on the way."""
    import stages.train.runner as train_runner
    from stages.score.runner import run_score
    from stages.train.concat import ConcatHead
    from stages.train.fusion import FusionHead
    from stages.train.runner import run_train

    base = tmp_path_factory.mktemp("synthetic")
    cfg = load_config(write_config(base))
    store = Store(str(base / "store"))
    write_synthetic_store(cfg, store)
    out = base / "out"
    run_score(cfg, store, out, progress=False)
    captured = Captured()
    real_probe_to_bytes = train_runner.probe_to_bytes

    def spy_probe(pipeline):
        captured.probes.append(pipeline)
        return real_probe_to_bytes(pipeline)

    def spy_method(cls, name):
        real = cls.to_bytes

        def to_bytes(self):
            captured.by_class.setdefault(name, []).append(self)
            return real(self)

        return to_bytes

    with pytest.MonkeyPatch.context() as mp:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # as the autouse fixture does for the tests that re-train
        mp.setattr(train_runner, "probe_to_bytes", spy_probe)
        mp.setattr(FusionHead, "to_bytes", spy_method(FusionHead, "fusion"))
        mp.setattr(ConcatHead, "to_bytes", spy_method(ConcatHead, "concat"))
        try:
            train_df = run_train(cfg, store, out, progress=False)
        finally:
            torch.set_num_threads(previous)
    # FusionHead serialises the MLP ablations and both fusions, in plan order
    captured.fused = dict(zip(("concat_mlp", "fusion_no_cooc", "fusion", "fusion_nu"), captured.by_class["fusion"]))
    captured.fused["concat"] = captured.by_class["concat"][0]
    return cfg, store, out, train_df, captured


def test_probes_and_nu_pick_the_separable_layer(trained):
    cfg, store, out, train_df, _ = trained
    var = pd.read_parquet(out / "variability.parquet")
    alpha_nu = var[(var["model"] == "alpha") & (var["pooling"] == "mean")].set_index("layer")["variability"]
    assert alpha_nu.idxmin() == 2
    layers = pd.read_parquet(out / "layers.parquet")
    alpha = layers[layers["model"] == "alpha"].set_index("layer")
    assert alpha["test_accuracy"].idxmax() == 2 and alpha["dev_accuracy"].idxmax() == 2
    assert alpha.loc[2, "test_accuracy"] >= 0.99
    assert alpha["nu"].to_dict() == pytest.approx(alpha_nu.to_dict())
    sel = pd.read_parquet(out / "selection.parquet").set_index("model")
    assert sel.loc["alpha", "selected_layer"] == 2 and sel.loc["alpha", "best_layer"] == 2 and sel.loc["alpha", "top_layer"] == 4
    assert sel.loc["alpha", "selected_test_accuracy"] > sel.loc["alpha", "top_test_accuracy"] + 0.3
    rho = stats.spearmanr(alpha.loc[1:, "nu"], alpha.loc[1:, "test_accuracy"]).statistic  # block outputs 1..L, as selection
    assert rho < -0.8 and sel.loc["alpha", "spearman_nu_accuracy"] == pytest.approx(rho)
    test = train_df[(train_df["split"] == "test") & (train_df["models"] == "alpha")].set_index("head")
    assert test.loc["selected", "layers"] == "2" and test.loc["top", "layers"] == "4"
    assert test.loc["selected", "accuracy"] > test.loc["top", "accuracy"]


def test_train_outputs_and_fusion_rows(trained):
    from stages.train.runner import TRAIN_COLUMNS

    cfg, store, out, train_df, _ = trained
    for name in ("train.parquet", "layers.parquet", "selection.parquet", "layers.png", "report.md"):
        assert (out / name).is_file(), name
    on_disk = pd.read_parquet(out / "train.parquet")
    assert list(on_disk.columns) == TRAIN_COLUMNS
    pd.testing.assert_frame_equal(on_disk, train_df)
    # no llama among the models: no llmembed head
    assert set(on_disk["head"]) == {"probe", "selected", "top", "concat", "concat_mlp", "fusion_no_cooc", "fusion", "fusion_nu"}
    assert set(on_disk["split"]) == {"dev", "test"}
    fused = on_disk[on_disk["head"].isin(["fusion", "concat", "concat_mlp", "fusion_no_cooc"])]
    assert len(fused) == 8 and (fused["n_params"] > 0).all()
    assert (fused["models"] == "alpha+beta").all() and (fused["layers"] == "alpha:4,beta:3").all()
    assert on_disk["accuracy"].between(0, 1).all()
    report = (out / "report.md").read_text()
    assert report.count("## Train: heads on cached features") == 1
    assert "## Hidden-state variability" in report  # the score section is kept
    assert "Random weights" in report.split("## Train")[1]  # the sources are tiny random models
    assert "### Fusion ablation" in report and "Chosen on dev only" in report


def test_fusion_nu_fuses_each_models_lowest_nu_layers(trained):
    cfg, store, out, train_df, captured = trained
    var = pd.read_parquet(out / "variability.parquet")
    expected = []
    for model in ("alpha", "beta"):
        rows = var[(var["model"] == model) & (var["pooling"] == "mean") & np.isfinite(var["variability"])]
        rows = rows[rows["layer"] >= 1]  # block outputs only (train.include_embeddings = false)
        lowest = sorted(rows.sort_values("variability")["layer"].head(cfg.train.fusion.nu_layers))
        expected += [f"{model}:{layer}" for layer in lowest]
    row = train_df[(train_df["head"] == "fusion_nu") & (train_df["split"] == "test")].iloc[0]
    assert row["layers"] == ",".join(expected)
    assert "alpha:2" in expected  # the separable layer is among alpha's lowest-nu layers
    assert captured.fused["fusion_nu"].block_names_ == sorted(f"{e}:mean" for e in expected)
    # the ablation heads differ from fusion only in the parts they drop
    assert captured.fused["fusion_no_cooc"].net_.mlp[0].in_features == 2 * cfg.train.fusion.width
    assert captured.fused["concat_mlp"].net_.mlp[0].in_features == MODELS["alpha"]["hidden"] + MODELS["beta"]["hidden"]
    assert captured.fused["fusion"].net_.mlp[0].in_features == 3 + 2 * cfg.train.fusion.width


def test_ablation_verdict_compares_dev_chosen_heads(trained):
    from stages.train.fused import ablation

    cfg, store, out, train_df, _ = trained
    table, verdict = ablation(train_df)
    assert list(table["head"]) == ["concat", "concat_mlp", "fusion_no_cooc", "fusion", "fusion_nu"]
    wide = train_df.pivot_table(index=["head", "models", "layers", "pooling"], columns="split", values="accuracy").reset_index()
    fused = wide[wide["head"].isin(["fusion", "fusion_nu", "llmembed"])]
    probes = wide[wide["head"] == "probe"]
    assert verdict["fused_dev"] == fused["dev"].max() and verdict["probe_dev"] == probes["dev"].max()
    assert verdict["probe"] == "alpha:2:mean"  # the separable layer wins on dev
    assert verdict["gain"] == pytest.approx(verdict["fused_test"] - verdict["probe_test"])
    assert verdict["wins"] == (verdict["gain"] >= 0.01)


def _stored_inputs(cfg, store, blocks, split: str) -> dict[str, np.ndarray]:
    from stages.entries import feature_requests, open_features

    reqs = {r.model.name: r for r in feature_requests(cfg) if r.split.name == split}
    return {
        str(b): np.asarray(open_features(store, reqs[b.model]).array(f"hidden/{b.pooling}").compute()[:, b.layer, :], dtype=np.float32)
        for b in blocks
    }


def test_saved_heads_reload_and_predict_identically(trained):
    from pipeline.blocks import Block
    from stages.entries import feature_requests
    from stages.predict import _head_blocks, heads_entry

    cfg, store, out, train_df, captured = trained
    entry = heads_entry(cfg, store)
    sel = pd.read_parquet(out / "selection.parquet").set_index("model")
    # probes are captured in fit order: per model, layers 0..n_layers
    order = [(m, layer) for m in ("alpha", "beta") for layer in range(MODELS[m]["n_layers"] + 1)]
    assert len(captured.probes) == len(order)
    in_memory = dict(zip(order, captured.probes))
    names = {f"probe:{m}:{layer}:mean": in_memory[(m, layer)] for m, layer in order}
    for m in ("alpha", "beta"):
        names[f"selected:{m}:mean"] = in_memory[(m, int(sel.loc[m, "selected_layer"]))]
        names[f"top:{m}:mean"] = in_memory[(m, MODELS[m]["n_layers"])]
    names.update(captured.fused)
    for name, original in names.items():
        head, blocks = _head_blocks(name, entry)
        if name.startswith("selected:alpha"):
            assert blocks == [Block("alpha", 2, "mean")]
        inputs = _stored_inputs(cfg, store, blocks, "test")
        X = inputs if name in captured.fused else inputs[str(blocks[0])]
        np.testing.assert_allclose(head.predict_proba(X), original.predict_proba(X), rtol=0, atol=1e-12, err_msg=name)
        # and the reloaded head reproduces the recorded test accuracy
        y = (
            store.open(next(r.key for r in feature_requests(cfg) if r.split.name == "test" and r.model.name == "alpha"))
            .table()["label"]
            .to_numpy()
        )
        kind, *rest = name.split(":")
        row = train_df[(train_df["split"] == "test") & (train_df["head"] == kind)]
        if kind == "probe":
            row = row[(row["models"] == rest[0]) & (row["layers"] == rest[1])]
        elif kind in ("selected", "top"):
            row = row[row["models"] == rest[0]]
        assert np.mean(head.predict(X) == y) == pytest.approx(row["accuracy"].item()), name


def test_train_twice_gives_identical_metrics(trained, tmp_path):
    from stages.train.runner import run_train

    cfg, store, out, train_df, _ = trained
    shutil.copy(out / "report.md", tmp_path / "report.md")
    again = run_train(cfg, store, tmp_path, progress=False)
    pd.testing.assert_frame_equal(again.drop(columns="fit_seconds"), train_df.drop(columns="fit_seconds"))
    a = pd.read_parquet(out / "layers.parquet").drop(columns="fit_seconds")
    b = pd.read_parquet(tmp_path / "layers.parquet").drop(columns="fit_seconds")
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "selection.parquet"), pd.read_parquet(tmp_path / "selection.parquet"))
    assert len(store.find(kind="heads")) == 1  # same lineage -> same write-once entry


def test_train_before_score_says_run_score(tmp_path):
    from stages.train.runner import run_train

    cfg = load_config(write_config(tmp_path))
    store = Store(str(tmp_path / "store"))
    write_synthetic_store(cfg, store)
    with pytest.raises(PipelineError, match=r"no scores .*run `make score CONFIG=.*synthetic\.toml STORE=\S+` first"):
        run_train(cfg, store, tmp_path / "out", progress=False)


def test_fusion_input_model_not_in_config_is_a_clear_error(trained):
    cfg, store, out, _, _ = trained
    # caught when the config is built, before any store access
    with pytest.raises(ConfigError, match=r"'gamma'.*not in \[\[models\]\].*configured: \['alpha', 'beta'\].*make extract"):
        dataclasses.replace(
            cfg,
            train=dataclasses.replace(cfg.train, fusion=dataclasses.replace(cfg.train.fusion, inputs=("alpha:-1:mean", "gamma:-1:mean"))),
        )


def test_model_in_config_but_not_in_store_says_run_extract(trained, tmp_path):
    from stages.train.runner import run_train

    cfg, store, out, _, _ = trained
    # the same data (same fingerprints), one more model that was never extracted
    bad = load_config(write_config(tmp_path, extra_models={"gamma": "tiny-random-t5"}))
    with pytest.raises(PipelineError, match=r"no features for synth/train/gamma .*make extract CONFIG=.*synthetic\.toml"):
        run_train(bad, store, tmp_path / "out", progress=False)


def _md_tables(text: str) -> list[pd.DataFrame]:
    """Every markdown table of a report, as strings."""
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            tables.append(pd.DataFrame(rows[2:], columns=rows[0]))
            rows = []
    return tables


def test_no_report_table_is_selected_on_test(tmp_path):
    """delta's best layer on test (2) differs from its best on dev (1); no table may show a test-chosen layer,
    and the embedding output (0, best of all) is not a candidate by default."""
    from stages.score.runner import run_score
    from stages.train.runner import run_train

    cfg = load_config(write_config(tmp_path, models=("delta",), fusion_inputs=("delta:-1:mean",)))
    store = Store(str(tmp_path / "store"))
    write_synthetic_store(cfg, store)
    out = tmp_path / "out"
    run_score(cfg, store, out, progress=False)
    run_train(cfg, store, out, progress=False)
    layers = pd.read_parquet(out / "layers.parquet").set_index("layer")
    cands = layers.loc[1:]
    assert cands["dev_accuracy"].idxmax() == 1 and cands["test_accuracy"].idxmax() == 2  # the setup holds
    assert layers["test_accuracy"].idxmax() in (0, 2)
    tables = _md_tables((out / "report.md").read_text())
    checked = 0
    for t in tables:
        model_col = "model" if "model" in t else ("models" if "models" in t else None)
        if model_col is None:
            continue
        for _, row in t[t[model_col] == "delta"].iterrows():
            for col in ("lowest_nu_layer", "selected_layer", "best_layer"):
                if col in row:
                    assert row[col] == "1", (col, dict(row))
                    checked += 1
            if "layers" in row and row.get("head", "probe") in ("probe", "selected"):
                assert row["layers"] == "1", dict(row)
                checked += 1
    assert checked >= 5
    sel = pd.read_parquet(out / "selection.parquet").iloc[0]
    assert sel["selected_layer"] == 1 and sel["best_layer"] == 1


def test_include_embeddings_lets_selection_pick_layer_0(tmp_path):
    from stages.score.runner import run_score
    from stages.train.runner import run_train

    path = write_config(tmp_path, models=("delta",), fusion_inputs=("delta:-1:mean",))
    cfg = load_config(path, overrides={"train.include_embeddings": True})
    store = Store(str(tmp_path / "store"))
    write_synthetic_store(cfg, store)
    run_score(cfg, store, tmp_path / "out", progress=False)
    run_train(cfg, store, tmp_path / "out", progress=False)
    sel = pd.read_parquet(tmp_path / "out" / "selection.parquet").iloc[0]
    assert sel["selected_layer"] == 0


@pytest.mark.parametrize("include_embeddings", [False, True])
def test_best_probes_pick_among_each_models_candidate_layers(include_embeddings):
    from stages.train.runner import best_probes

    probes = pd.DataFrame(
        {
            "models": ["deep", "deep", "deep", "flat"],
            "layers": ["0", "1", "2", "0"],  # flat keeps one hidden state (a pooler output): its only layer counts
            "pooling": ["mean"] * 4,
            "dev_accuracy": [0.9, 0.7, 0.8, 0.6],
        }
    )
    best = best_probes(probes, include_embeddings=include_embeddings)
    assert dict(zip(best["models"], best["layers"])) == {"deep": "0" if include_embeddings else "2", "flat": "0"}


class _CountingEntry:
    """The two things FeatureCache asks of a store entry, counting the reads."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays, self.reads = arrays, []

    def datasets(self) -> dict:
        return {name: (a.shape[1:], a.dtype) for name, a in self.arrays.items()}

    def read(self, name: str) -> np.ndarray:
        self.reads.append(name)
        return self.arrays[name].copy()


@pytest.mark.parametrize("dtype", ["<f2", ">f2", "<f4"])  # as extract writes it, big-endian from elsewhere, float32
def test_feature_cache_reads_each_pooling_once_and_casts_one_layer_exactly(dtype):
    from pipeline.blocks import Block
    from stages.train.runner import FeatureCache

    stored = np.random.default_rng(0).standard_normal((7, 4, 5)).astype(dtype)
    entry = _CountingEntry({"hidden/mean": stored})
    cache = FeatureCache({("alpha", "train"): entry})
    for layer in range(4):
        got = cache.layer(Block("alpha", layer, "mean"), "train")
        assert got.dtype == np.float32 and got.shape == (7, 5)
        np.testing.assert_array_equal(got, stored[:, layer, :].astype(np.float32))
    assert entry.reads == ["hidden/mean"]
    with pytest.raises(PipelineError, match="pooling 'last' was not extracted"):
        cache.layer(Block("alpha", 0, "last"), "train")


@pytest.mark.parametrize("include_embeddings", [False, True])
def test_spearman_nu_accuracy_is_over_the_layers_selection_chooses_among(include_embeddings):
    """Layer 0 (infinite nu, chance accuracy) would turn a positive trend over layers 1..3 into a negative one."""
    from stages.train.runner import select_layers, selection_record

    df = pd.DataFrame(
        {
            "layer": [0, 1, 2, 3],
            "nu": [np.inf, 1.0, 2.0, 3.0],
            "dev_accuracy": [0.5, 0.7, 0.8, 0.9],
            "test_accuracy": [0.5, 0.7, 0.8, 0.9],
        }
    )
    record = selection_record(
        df, "m", "mean", 3, *select_layers(df, include_embeddings=include_embeddings), include_embeddings=include_embeddings
    )
    expected = stats.spearmanr([4, 1, 2, 3], df["test_accuracy"]).statistic if include_embeddings else 1.0
    assert record["spearman_nu_accuracy"] == pytest.approx(expected)
    assert (record["spearman_nu_accuracy"] < 0) == include_embeddings
