"""Train stage: heads fitted on cached features only (no model forward pass).

Per-layer probes give the accuracy curve users compare with ``nu``; the probe at the
lowest-``nu`` layer is set against the top-layer probe (Xie et al.); a fused head over
several models' blocks (LLMEmbed) is set against a concatenation baseline. All heads are
saved to the store with the keys of the features they were trained on.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.blocks import Block, among_candidates
from pipeline.config import ExperimentConfig
from pipeline.device import resolve_device
from pipeline.errors import ConfigError, PipelineError, rerun_hint
from pipeline.progress import tqdm
from stages.entries import config_scores_key, head_file, heads_format, heads_key, load_scores, make_lineage, open_verified, train_requests
from stages.report import TRAIN_MARKER, md_table, write_section
from stages.train.fused import FUSED_HEADS, ablation_section, fit_fused, plan_heads
from stages.train.metrics import TRAIN_COLUMNS, metric_rows
from stages.train.plots import plot_layers
from stages.train.probes import probe_layers, probe_to_bytes, spearman_nu_accuracy

log = logging.getLogger(__name__)


@dataclass
class FeatureCache:
    """Pooled hidden states of each (model, pooling, split), read from the store once."""

    entries: dict[tuple[str, str], object]
    arrays: dict[tuple[str, str, str], np.ndarray] = field(default_factory=dict)

    def get(self, model: str, pooling: str, split: str) -> np.ndarray:
        key = (model, pooling, split)
        if key not in self.arrays:
            entry = self.entries[(model, split)]
            if f"hidden/{pooling}" not in entry.datasets():
                if pooling == "pooler":
                    raise PipelineError(
                        f"{model}/{split}: no pooler output was stored (random weights, or no trained pooler "
                        f"in the checkpoint); use {model}:-1:first instead"
                    )
                raise PipelineError(
                    f"{model}/{split}: pooling {pooling!r} was not extracted; add it to extract.poolings and re-run `make extract`"
                )
            self.arrays[key] = entry.read(f"hidden/{pooling}")
        return self.arrays[key]

    def layer(self, block: Block, split: str) -> np.ndarray:
        """One layer's features as float32 (torch casts float16 about 4x faster than numpy here)."""
        import torch

        x = self.get(block.model, block.pooling, split)[:, block.layer, :]
        if not x.dtype.isnative:  # an HDF5 file written big-endian elsewhere: torch takes native byte order only
            return np.asarray(x, dtype=np.float32)
        return torch.from_numpy(x).to(torch.float32).numpy()


def _labels(entry) -> np.ndarray:
    return entry.table()["label"].to_numpy()


@dataclass
class TrainInputs:
    """What every head is fitted on: the opened features, their labels and the scores' nu table."""

    requests: list
    entries: dict[tuple[str, str], object]
    cache: FeatureCache
    splits: tuple[str, str, str]  # (train, dev, test)
    y: dict[str, np.ndarray]
    scores_key: str
    nu_table: pd.DataFrame

    @property
    def train_models(self) -> dict:
        """Model name -> its train-split feature request, in config order."""
        return {r.model.name: r for r in self.requests if r.split.name == self.splits[0]}

    def n_layers(self, model: str) -> int:
        return int(self.entries[(model, self.splits[0])].description["n_layers"])


@dataclass
class ProbeTables:
    """The probes of every (model, pooling): train-table rows, per-layer tables, layer selections, head files."""

    rows: list[dict] = field(default_factory=list)
    layers: list[pd.DataFrame] = field(default_factory=list)
    selection: list[dict] = field(default_factory=list)
    blobs: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainResult:
    """What the outputs folder and the report are written from."""

    train_df: pd.DataFrame  # one row per head and reported split (TRAIN_COLUMNS)
    layers_df: pd.DataFrame  # one row per probed layer, with its nu
    selection_df: pd.DataFrame  # one row per (model, pooling): nu-selected, top and dev-best layers
    key: str  # the heads entry
    random_models: list[str]  # "name (source)" of the models with random weights
    chance: float  # test accuracy of the train split's majority class
    label_names: list[str] | None


def run_train(cfg: ExperimentConfig, store, out: Path, *, progress: bool = True) -> pd.DataFrame:
    data = open_inputs(cfg, store)
    probes = fit_all_probes(cfg, data, progress=progress)
    plans = plan_heads(cfg, data.requests, data.entries, data.splits[0], data.nu_table)
    fused_rows, fused_blobs = fit_fused(cfg, data.cache, plans, data.y, data.splits)
    train_df = pd.DataFrame(probes.rows + fused_rows, columns=TRAIN_COLUMNS)
    lineage = make_lineage(cfg, data.requests, data.scores_key)
    key = _save_heads(store, cfg, {**probes.blobs, **fused_blobs}, train_df, lineage)
    train_split, _, test_split = data.splits
    chance = float(np.mean(data.y[test_split] == _majority(data.y[train_split])))
    random_models = [f"{r.model.name} ({r.spec.source})" for r in data.train_models.values() if r.spec.random_init]
    result = TrainResult(
        train_df=train_df,
        layers_df=pd.concat(probes.layers, ignore_index=True),
        selection_df=pd.DataFrame(probes.selection),
        key=key,
        random_models=random_models,
        chance=chance,
        label_names=lineage["label_names"],
    )
    _write_outputs(cfg, out, result)
    return train_df


def open_inputs(cfg: ExperimentConfig, store) -> TrainInputs:
    """Open the features and scores train needs; every missing input fails here, before any fitting."""
    splits = (cfg.data.splits[0], cfg.train.dev_split, cfg.train.test_split)
    requests = train_requests(cfg)
    entries = {(r.model.name, r.split.name): e for r, e in zip(requests, open_verified(store, requests, config=cfg.source))}
    _fusion_blocks(cfg, entries, splits[0])  # named fusion inputs: a config error before any fitting
    skey = config_scores_key(cfg, requests)
    if not store.exists(skey):
        raise PipelineError(f"no scores for this config in {store.url}; run `{rerun_hint('score', cfg.source, store.url)}` first")
    nu_table = load_scores(store, skey)
    first = next(r.model.name for r in requests if r.split.name == splits[0])
    y = {s: _labels(entries[(first, s)]) for s in splits}
    return TrainInputs(
        requests=requests, entries=entries, cache=FeatureCache(entries), splits=splits, y=y, scores_key=skey, nu_table=nu_table
    )


def fit_all_probes(cfg: ExperimentConfig, data: TrainInputs, *, progress: bool = True) -> ProbeTables:
    """Per-layer probes of every (model, pooling), on the device the features were computed on."""
    device = resolve_device(cfg.extract.device)
    tables = ProbeTables()
    jobs = [(m, p) for m in data.train_models for p in cfg.train.poolings]
    for model, pooling in tqdm(jobs, desc="train probes", unit="model/pooling", disable=not progress):
        df, blobs = fit_layer_probes(cfg, data, model, pooling, device)
        rows, selection, chosen = select_probes(cfg, df, model, pooling, data.n_layers(model), blobs)
        tables.layers.append(df)
        tables.rows += rows
        tables.selection.append(selection)
        tables.blobs.update(blobs)
        tables.blobs.update(chosen)
    return tables


def fit_layer_probes(cfg: ExperimentConfig, data: TrainInputs, model: str, pooling: str, device) -> tuple[pd.DataFrame, dict[str, bytes]]:
    """One probe per layer of ``model``'s ``pooling`` features: the per-layer table (with nu) and each probe's files."""
    train_split, dev_split, test_split = data.splits
    blobs: dict[str, bytes] = {}

    def load(layer: int):
        b = Block(model, layer, pooling)
        return data.cache.layer(b, train_split), data.cache.layer(b, dev_split), data.cache.layer(b, test_split)

    def keep(layer: int, res) -> None:
        blobs.update(heads_format.entry_files(head_file(f"probe:{model}:{layer}:{pooling}"), probe_to_bytes(res.model)))

    df = probe_layers(
        load,
        data.y[train_split],
        data.y[dev_split],
        data.y[test_split],
        layers=range(data.n_layers(model) + 1),
        Cs=cfg.train.Cs,
        seed=cfg.seed,
        on_result=keep,
        device=device,
    )
    nus = data.nu_table[(data.nu_table["model"] == model) & (data.nu_table["pooling"] == pooling)].set_index("layer")["variability"]
    df.insert(0, "pooling", pooling)
    df.insert(0, "model", model)
    df["nu"] = df["layer"].map(nus)
    return df, blobs


def select_probes(
    cfg: ExperimentConfig, df: pd.DataFrame, model: str, pooling: str, n_layers: int, blobs: dict[str, bytes]
) -> tuple[list[dict], dict, dict[str, bytes]]:
    """From one per-layer table: its train-table rows (every probe, then the nu-selected and top ones),
    its selection record, and the selected and top probes' files under their own head names."""
    rows = []
    for r in df.itertuples(index=False):
        rows += metric_rows(cfg.data.name, "probe", model, str(r.layer), pooling, r._asdict(), int(r.n_params), float(r.fit_seconds))
    sel, top, best = select_layers(df, include_embeddings=cfg.train.include_embeddings)
    chosen: dict[str, bytes] = {}
    for head, r in (("selected", sel), ("top", top)):
        if r is not None:
            layer = int(r["layer"])
            rows += metric_rows(cfg.data.name, head, model, str(layer), pooling, r.to_dict(), int(r["n_params"]), float(r["fit_seconds"]))
            src, dst = head_file(f"probe:{model}:{layer}:{pooling}"), head_file(f"{head}:{model}:{pooling}")
            for suffix in heads_format.SUFFIXES:
                chosen[f"{dst}.{suffix}"] = blobs[f"{src}.{suffix}"]
    record = selection_record(df, model, pooling, n_layers, sel, top, best, include_embeddings=cfg.train.include_embeddings)
    return rows, record, chosen


def selection_record(df: pd.DataFrame, model: str, pooling: str, n_layers: int, sel, top, best, *, include_embeddings: bool) -> dict:
    """One row of selection.parquet: the nu-selected, top and dev-best layers and their accuracies, and
    the rank correlation of nu with test accuracy over the layers selection chooses among."""
    cands = among_candidates(df, include_embeddings)
    return {
        "model": model,
        "pooling": pooling,
        "n_layers": n_layers,
        "selected_layer": int(sel["layer"]) if sel is not None else -1,
        "selected_dev_accuracy": float(sel["dev_accuracy"]) if sel is not None else float("nan"),
        "selected_test_accuracy": float(sel["test_accuracy"]) if sel is not None else float("nan"),
        "top_layer": int(top["layer"]),
        "top_dev_accuracy": float(top["dev_accuracy"]),
        "top_test_accuracy": float(top["test_accuracy"]),
        "best_layer": int(best["layer"]),
        "best_dev_accuracy": float(best["dev_accuracy"]),
        "best_test_accuracy": float(best["test_accuracy"]),
        "spearman_nu_accuracy": spearman_nu_accuracy(cands["nu"].to_numpy(), cands["test_accuracy"].to_numpy()),
    }


def _majority(y: np.ndarray):
    values, counts = np.unique(y, return_counts=True)
    return values[np.argmax(counts)]


def select_layers(df: pd.DataFrame, *, include_embeddings: bool = False):
    """(nu-selected row, top-layer row, dev-best row) of one model/pooling's per-layer probe table.

    Both choices look only at candidate layers (block outputs 1..L unless ``include_embeddings``)
    and never at test: the nu-selected layer has the lowest finite nu (computed on the training
    split), the dev-best the highest dev accuracy (the first on ties). None where no candidate has a finite nu.
    """
    cands = among_candidates(df, include_embeddings)
    finite = cands[np.isfinite(cands["nu"])]
    sel = finite.loc[finite["nu"].idxmin()] if len(finite) else None
    best = cands.loc[cands["dev_accuracy"].idxmax()]
    return sel, df.loc[df["layer"].idxmax()], best


def _fusion_blocks(cfg: ExperimentConfig, entries, train_split: str) -> list[Block]:
    """The named fusion inputs, resolved; raises a ConfigError before any fitting if one cannot be."""
    blocks = []
    for text in cfg.train.fusion.inputs:
        b = Block.parse(text)
        if (b.model, train_split) not in entries:
            raise ConfigError(
                f"train.fusion.inputs: model {b.model!r} of {text!r} is not in [[models]] (configured: "
                f"{sorted({m for m, _ in entries})}); add it and run `make extract`"
            )
        blocks.append(b.resolved(int(entries[(b.model, train_split)].description["n_layers"])))
    return blocks


def _save_heads(store, cfg: ExperimentConfig, blobs: dict[str, bytes], train_df: pd.DataFrame, lineage: dict) -> str:
    """One write-once ``heads`` entry: every head (safetensors + JSON), the metrics and the lineage."""
    key = heads_key(lineage)
    if store.exists(key):
        return key
    desc = {
        "kind": "heads",
        "name": f"{cfg.data.name}/heads/{cfg.name}",
        "dataset": {"name": cfg.data.name, "split": "heads"},
        "model": {"name": "+".join(m.name for m in cfg.models)},
        "features": lineage["features"],
        "scores": lineage["scores"],
    }
    writer = store.writer(key, desc, n_shards=0)
    for name, data in sorted(blobs.items()):
        writer.write_file(name, data)
    buf = io.BytesIO()
    train_df.to_parquet(buf, index=False)
    writer.write_file("train.parquet", buf.getvalue())
    writer.write_file("lineage.json", json.dumps(lineage, indent=2, sort_keys=True).encode())
    names = sorted(
        {
            f"{h}:{m}:{lay}:{p}" if h == "probe" else (h if h in FUSED_HEADS else f"{h}:{m}:{p}")
            for h, m, lay, p in train_df[["head", "models", "layers", "pooling"]].itertuples(index=False)
        }
    )
    writer.write_file("heads.json", json.dumps({n: head_file(n) for n in names}, indent=2, sort_keys=True).encode())
    writer.commit()
    return key


def best_probes(probes: pd.DataFrame, *, include_embeddings: bool = False) -> pd.DataFrame:
    """Per model, the probe (any pooling) with the highest dev accuracy among candidate layers; ties to the first row."""
    cands = among_candidates(probes, include_embeddings, layer="layers", model="models")
    order = cands.sort_values("dev_accuracy", ascending=False, kind="mergesort")
    return order.groupby("models", sort=False).head(1)


def _write_outputs(cfg, out: Path, result: TrainResult) -> None:
    """The tables, one plot per pooling and the train section of report.md."""
    out.mkdir(parents=True, exist_ok=True)
    result.train_df.to_parquet(out / "train.parquet", index=False)
    result.layers_df.to_parquet(out / "layers.parquet", index=False)
    result.selection_df.to_parquet(out / "selection.parquet", index=False)
    _plot_layers(cfg, out, result.layers_df, result.selection_df, result.chance)
    write_section(out / "report.md", cfg.name, TRAIN_MARKER, train_section(cfg, result))
    log.info("train: wrote %s/train.parquet, layers.png and the train section of report.md", out)


def _plot_layers(cfg, out: Path, layers_df: pd.DataFrame, selection_df: pd.DataFrame, chance: float) -> None:
    """Probe accuracy and nu per layer, one plot per pooling, the nu-selected and dev-best layers marked."""
    where = f"{cfg.data.name}, probes fitted on {cfg.data.splits[0]}, chosen on {cfg.train.dev_split}"
    for pooling, part in layers_df.groupby("pooling", sort=False):
        sel = selection_df[selection_df["pooling"] == pooling].set_index("model")
        marks = {m: {"lowest nu": int(r.selected_layer), "best on dev": int(r.best_layer)} for m, r in sel.iterrows()}
        plot_layers(
            part,
            out / ("layers.png" if pooling == cfg.train.poolings[0] else f"layers_{pooling}.png"),
            title=f"{where}: probe accuracy and nu per layer ({pooling} pooling)",
            chance=chance,
            marks=marks,
        )


def train_section(cfg, result: TrainResult) -> str:
    """The train section of report.md (Markdown): the summary, layer selection, best probes and ablation tables."""
    train_df, selection_df, chance = result.train_df, result.selection_df, result.chance
    wide = train_df.pivot_table(index=["head", "models", "layers", "pooling"], columns="split", values="accuracy", sort=False).reset_index()
    wide = wide.rename(columns={"dev": "dev_accuracy", "test": "test_accuracy"})
    meta = train_df[train_df["split"] == "test"][["head", "models", "layers", "pooling", "macro_f1", "n_params", "fit_seconds"]]
    wide = wide.merge(meta.rename(columns={"macro_f1": "test_macro_f1"}), on=["head", "models", "layers", "pooling"], how="left")
    summary = wide[wide["head"].isin(["selected", "top", "fusion", "concat"])][
        ["head", "models", "layers", "pooling", "dev_accuracy", "test_accuracy", "test_macro_f1", "n_params", "fit_seconds"]
    ]
    best = best_probes(wide[wide["head"] == "probe"], include_embeddings=cfg.train.include_embeddings)
    among = "all hidden states 0..L" if cfg.train.include_embeddings else "block outputs 1..L"
    section = [f"{TRAIN_MARKER} (store entry {result.key[:12]})", ""]
    if result.random_models:
        section += [
            f"> **Random weights:** {', '.join(result.random_models)}; their heads show the pipeline works, not what a trained model does.",
            "",
        ]
    if result.label_names:
        section += ["Classes: " + ", ".join(f"{i} = {n}" for i, n in enumerate(result.label_names)), ""]
    section += [
        f"Selection protocol: every choice is made without the {cfg.train.test_split} split. A probe's C is chosen on "
        f"{cfg.train.dev_split}; the variability-selected layer is the lowest nu (on {cfg.score.split}) and the best layer "
        f"the highest {cfg.train.dev_split} accuracy, both among {among} (`train.include_embeddings`); "
        f"{cfg.train.test_split} accuracy is only reported. Chance (the {cfg.data.splits[0]} majority class on "
        f"{cfg.train.test_split}): {chance:.3f}. A probe's fit_seconds is its share of the batch of layers fitted together "
        "with it (the batch's time / its layers; `train` batches as many layers of a model and pooling as fit in 1 GiB). "
        "Full tables: train.parquet, layers.parquet, selection.parquet.",
        "",
        md_table(summary),
        "",
        "### Variability-selected layer vs top layer",
        "",
        f"spearman_nu_accuracy: rank correlation of nu with {cfg.train.test_split} accuracy over {among}, the layers "
        "selection chooses among (negative = lower nu goes with higher accuracy, as Xie et al. claim).",
        "",
        md_table(
            selection_df[
                [
                    "model",
                    "pooling",
                    "selected_layer",
                    "selected_dev_accuracy",
                    "selected_test_accuracy",
                    "top_layer",
                    "top_dev_accuracy",
                    "top_test_accuracy",
                    "best_layer",
                    "best_dev_accuracy",
                    "best_test_accuracy",
                    "spearman_nu_accuracy",
                ]
            ]
        ),
        "",
        f"### Best probe per model (chosen on {cfg.train.dev_split})",
        "",
        md_table(best[["models", "layers", "pooling", "dev_accuracy", "test_accuracy", "test_macro_f1"]]),
        "",
        *ablation_section(train_df, include_embeddings=cfg.train.include_embeddings),
        "![layers](layers.png)",
        "",
    ]
    return "\n".join(section)
