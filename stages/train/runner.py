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
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import ExperimentConfig, to_dict
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

TRAIN_VERSION = 1
TRAIN_COLUMNS = ["dataset", "head", "models", "layers", "pooling", "split", "accuracy", "macro_f1", "n_params", "fit_seconds"]


@dataclass(frozen=True)
class Block:
    """A feature block ``model:layer:pooling``; negative layers count from the top."""

    model: str
    layer: int
    pooling: str

    @classmethod
    def parse(cls, text: str) -> "Block":
        """``model:layer:pooling``, or ``model:pooler`` for the stored pooler output (its one "layer" is 0)."""
        from pipeline.config import parse_block

        model, layer, pooling = parse_block(text, "train.fusion.inputs")
        return cls(model, 0 if pooling == "pooler" else layer, pooling)

    def resolved(self, n_layers: int) -> "Block":
        if self.pooling == "pooler":
            return self
        layer = self.layer if self.layer >= 0 else n_layers + 1 + self.layer
        if not 0 <= layer <= n_layers:
            raise ConfigError(f"train.fusion.inputs: layer {self.layer} of {self.model} is out of range 0..{n_layers} (or -1..-{n_layers + 1})")
        return Block(self.model, layer, self.pooling)

    def __str__(self) -> str:
        return f"{self.model}:pooler" if self.pooling == "pooler" else f"{self.model}:{self.layer}:{self.pooling}"


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
                    raise PipelineError(f"{model}/{split}: no pooler output was stored (random weights, or no trained pooler "
                                        f"in the checkpoint); use {model}:-1:first instead")
                raise PipelineError(f"{model}/{split}: pooling {pooling!r} was not extracted; add it to extract.poolings and re-run `make extract`")
            self.arrays[key] = entry.array(f"hidden/{pooling}").compute()
        return self.arrays[key]

    def layer(self, block: Block, split: str) -> np.ndarray:
        return np.asarray(self.get(block.model, block.pooling, split)[:, block.layer, :], dtype=np.float32)


def _labels(entry) -> np.ndarray:
    return entry.table()["label"].to_numpy()


def head_file(name: str) -> str:
    """A store-safe file stem for a head name like 'probe:bert:3:mean'."""
    return name.replace(":", "-")


def run_train(cfg: ExperimentConfig, store, out: Path, *, progress: bool = True) -> pd.DataFrame:
    from tqdm.auto import tqdm

    from stages.score.runner import load_scores, open_features
    from stages.train.probes import probe_layers, probe_to_bytes, spearman_nu_accuracy

    train_split, dev_split, test_split = cfg.data.splits[0], cfg.train.dev_split, cfg.train.test_split
    requests = train_requests(cfg)
    entries = {(r.model.name, r.split.name): open_features(store, r, config=cfg.source) for r in requests}
    from stages.train.fused import ablation_section, fit_fused, plan_heads

    _fusion_blocks(cfg, entries, train_split)  # named fusion inputs: a config error before any fitting
    by_model = {r.model.name: r for r in requests if r.split.name == train_split}
    skey = _scores_key(cfg, requests)
    if not store.exists(skey):
        raise PipelineError(f"no scores for this config in {store.url}; run `make score CONFIG={cfg.source or '...'}` first")
    nu_table = load_scores(store, skey)
    cache = FeatureCache(entries)
    y = {s: _labels(entries[(next(iter(by_model)), s)]) for s in (train_split, dev_split, test_split)}
    rows: list[dict] = []
    layer_rows: list[pd.DataFrame] = []
    selection: list[dict] = []
    blobs: dict[str, bytes] = {}
    random_models = [f"{r.model.name} ({r.spec.source})" for r in by_model.values() if r.spec.random_init]

    def add_rows(head: str, models: str, layers: str, pooling: str, metrics: dict, n_params: int, seconds: float) -> None:
        for split in ("dev", "test"):
            rows.append({"dataset": cfg.data.name, "head": head, "models": models, "layers": layers, "pooling": pooling,
                         "split": split, "accuracy": metrics[f"{split}_accuracy"], "macro_f1": metrics[f"{split}_macro_f1"],
                         "n_params": n_params, "fit_seconds": seconds})

    jobs = [(m, p) for m in by_model for p in cfg.train.poolings]
    for model, pooling in tqdm(jobs, desc="train probes", unit="model/pooling", disable=not progress):
        n_layers = int(entries[(model, train_split)].description["n_layers"])

        def load(layer: int, model=model, pooling=pooling):
            b = Block(model, layer, pooling)
            return cache.layer(b, train_split), cache.layer(b, dev_split), cache.layer(b, test_split)

        def keep(layer: int, res, model=model, pooling=pooling):
            stem = head_file(f"probe:{model}:{layer}:{pooling}")
            for name, data in probe_to_bytes(res.model).items():
                blobs[f"{stem}.{name.split('.', 1)[1]}"] = data

        df = probe_layers(load, y[train_split], y[dev_split], y[test_split], layers=range(n_layers + 1),
                          Cs=cfg.train.Cs, seed=cfg.seed, on_result=keep)
        nus = nu_table[(nu_table["model"] == model) & (nu_table["pooling"] == pooling)].set_index("layer")["variability"]
        df.insert(0, "pooling", pooling)
        df.insert(0, "model", model)
        df["nu"] = df["layer"].map(nus)
        layer_rows.append(df)
        for r in df.itertuples(index=False):
            add_rows("probe", model, str(r.layer), pooling, r._asdict(), int(r.n_params), float(r.fit_seconds))
        finite = df[np.isfinite(df["nu"])]
        top = df.iloc[-1]
        sel = finite.loc[finite["nu"].idxmin()] if len(finite) else None
        for head, r in (("selected", sel), ("top", top)):
            if r is not None:
                add_rows(head, model, str(int(r["layer"])), pooling, r.to_dict(), int(r["n_params"]), float(r["fit_seconds"]))
                src = head_file(f"probe:{model}:{int(r['layer'])}:{pooling}")
                dst = head_file(f"{head}:{model}:{pooling}")
                for suffix in ("safetensors", "json"):
                    blobs[f"{dst}.{suffix}"] = blobs[f"{src}.{suffix}"]
        selection.append({"model": model, "pooling": pooling, "n_layers": n_layers,
                          "selected_layer": int(sel["layer"]) if sel is not None else -1,
                          "selected_test_accuracy": float(sel["test_accuracy"]) if sel is not None else float("nan"),
                          "top_layer": int(top["layer"]), "top_test_accuracy": float(top["test_accuracy"]),
                          "best_layer": int(df.loc[df["dev_accuracy"].idxmax(), "layer"]),
                          "best_test_accuracy": float(df.loc[df["dev_accuracy"].idxmax(), "test_accuracy"]),
                          "spearman_nu_accuracy": spearman_nu_accuracy(df["nu"].to_numpy(), df["test_accuracy"].to_numpy())})

    plans = plan_heads(cfg, requests, entries, train_split, nu_table)
    blobs.update(fit_fused(cfg, cache, plans, y, (train_split, dev_split, test_split), add_rows))

    train_df = pd.DataFrame(rows, columns=TRAIN_COLUMNS)
    layers_df = pd.concat(layer_rows, ignore_index=True)
    selection_df = pd.DataFrame(selection)
    lineage = make_lineage(cfg, requests, skey)
    key = _save_heads(store, cfg, blobs, train_df, lineage)
    _write_outputs(cfg, out, train_df, layers_df, selection_df, random_models, key)
    return train_df


def train_requests(cfg: ExperimentConfig):
    """Feature requests for the train, dev and test splits of every configured model."""
    from pipeline.data import load_splits
    from pipeline.orchestrate import feature_requests

    names = dict.fromkeys((cfg.data.splits[0], cfg.train.dev_split, cfg.train.test_split))
    splits = load_splits(cfg.data, cfg.seed)
    return feature_requests(cfg, splits={s: splits[s] for s in names})


def make_lineage(cfg: ExperimentConfig, requests, scores: str) -> dict:
    return {"config": to_dict(cfg), "features": {f"{r.model.name}/{r.split.name}": r.key for r in requests}, "scores": scores}


def _scores_key(cfg: ExperimentConfig, requests) -> str:
    """Key of the scores entry `make score` wrote for these features and keywords."""
    from stages.score.runner import load_keywords, scores_key

    return scores_key([r.key for r in requests if r.split.name == cfg.score.split], load_keywords(cfg.score.keywords))


def expected_heads_key(cfg: ExperimentConfig) -> str:
    """The heads entry `make train` writes for this config and these exact features."""
    requests = train_requests(cfg)
    skey = _scores_key(cfg, requests)
    return heads_key(make_lineage(cfg, requests, skey))


def _fusion_blocks(cfg: ExperimentConfig, entries, train_split: str) -> list[Block]:
    """The named fusion inputs, resolved; raises a ConfigError before any fitting if one cannot be."""
    blocks = []
    for text in cfg.train.fusion.inputs:
        b = Block.parse(text)
        if (b.model, train_split) not in entries:
            raise ConfigError(f"train.fusion.inputs: model {b.model!r} of {text!r} is not in [[models]] (configured: "
                              f"{sorted({m for m, _ in entries})}); add it and run `make extract`")
        blocks.append(b.resolved(int(entries[(b.model, train_split)].description["n_layers"])))
    return blocks


def heads_key(lineage: dict) -> str:
    from store import fingerprint

    return fingerprint({"kind": "heads", "version": TRAIN_VERSION, "features": lineage["features"], "scores": lineage["scores"],
                        "train": lineage["config"]["train"], "seed": lineage["config"]["seed"]})


def _save_heads(store, cfg: ExperimentConfig, blobs: dict[str, bytes], train_df: pd.DataFrame, lineage: dict) -> str:
    """One write-once ``heads`` entry: every head (safetensors + JSON), the metrics and the lineage."""
    key = heads_key(lineage)
    if store.exists(key):
        return key
    desc = {"kind": "heads", "name": f"{cfg.data.name}/heads/{cfg.name}", "dataset": {"name": cfg.data.name, "split": "heads"},
            "model": {"name": "+".join(m.name for m in cfg.models)}, "features": lineage["features"], "scores": lineage["scores"]}
    writer = store.writer(key, desc, n_shards=0)
    for name, data in sorted(blobs.items()):
        writer.write_file(name, data)
    buf = io.BytesIO()
    train_df.to_parquet(buf, index=False)
    writer.write_file("train.parquet", buf.getvalue())
    writer.write_file("lineage.json", json.dumps(lineage, indent=2, sort_keys=True).encode())
    from stages.train.fused import FUSED_HEADS

    names = sorted({f"{h}:{m}:{lay}:{p}" if h == "probe" else (h if h in FUSED_HEADS else f"{h}:{m}:{p}")
                    for h, m, lay, p in train_df[["head", "models", "layers", "pooling"]].itertuples(index=False)})
    writer.write_file("heads.json", json.dumps({n: head_file(n) for n in names}, indent=2, sort_keys=True).encode())
    writer.commit()
    return key


def _write_outputs(cfg, out: Path, train_df: pd.DataFrame, layers_df: pd.DataFrame, selection_df: pd.DataFrame, random_models, key: str) -> None:
    from stages.score.runner import _md_table
    from stages.train.fused import ablation_section
    from stages.train.plots import plot_layers

    out.mkdir(parents=True, exist_ok=True)
    train_df.to_parquet(out / "train.parquet", index=False)
    layers_df.to_parquet(out / "layers.parquet", index=False)
    selection_df.to_parquet(out / "selection.parquet", index=False)
    for pooling, part in layers_df.groupby("pooling", sort=False):
        plot_layers(part, out / ("layers.png" if pooling == cfg.train.poolings[0] else f"layers_{pooling}.png"),
                    title=f"{cfg.data.name}: probe test accuracy and nu per layer ({pooling} pooling)")
    test = train_df[train_df["split"] == "test"]
    summary = test[test["head"].isin(["selected", "top", "fusion", "concat"])][["head", "models", "layers", "pooling", "accuracy", "macro_f1", "n_params", "fit_seconds"]]
    best = test[test["head"] == "probe"].sort_values("accuracy", ascending=False).groupby("models", sort=False).head(1)
    section = [f"## Train: heads on cached features (store entry {key[:12]})", ""]
    if random_models:
        section += [f"> **Random weights:** {', '.join(random_models)}; their heads show the pipeline works, not what a trained model does.", ""]
    section += ["Test-split results; the probe for each layer is chosen on dev. Full tables: train.parquet, layers.parquet, selection.parquet.", "",
                _md_table(summary), "", "### Variability-selected layer vs top layer", "",
                _md_table(selection_df[["model", "pooling", "selected_layer", "selected_test_accuracy", "top_layer", "top_test_accuracy",
                                        "best_layer", "best_test_accuracy", "spearman_nu_accuracy"]]), "",
                "### Best probe per model (by test accuracy)", "",
                _md_table(best[["models", "layers", "pooling", "accuracy", "macro_f1"]]), "", *ablation_section(train_df),
                "![layers](layers.png)", ""]
    report = out / "report.md"
    text = report.read_text(encoding="utf-8") if report.exists() else f"# {cfg.name}\n\n"
    text = text.split("## Train: heads on cached features")[0].rstrip() + "\n\n"
    report.write_text(text + "\n".join(section), encoding="utf-8")
    log.info("train: wrote %s/train.parquet, layers.png and the train section of report.md", out)
