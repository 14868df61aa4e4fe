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

from pipeline.blocks import Block, candidate_layers
from pipeline.config import ExperimentConfig
from pipeline.device import resolve_device
from pipeline.errors import ConfigError, PipelineError, rerun_hint
from pipeline.progress import tqdm
from stages.entries import config_scores_key, head_file, heads_key, load_scores, make_lineage, open_features, train_requests
from stages.report import md_table, write_section
from stages.train.fused import FUSED_HEADS, ablation_section, fit_fused, plan_heads
from stages.train.plots import plot_layers
from stages.train.probes import probe_layers, probe_to_bytes, spearman_nu_accuracy

log = logging.getLogger(__name__)

TRAIN_COLUMNS = ["dataset", "head", "models", "layers", "pooling", "split", "accuracy", "macro_f1", "n_params", "fit_seconds"]


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
            self.arrays[key] = entry.array(f"hidden/{pooling}").compute()
        return self.arrays[key]

    def layer(self, block: Block, split: str) -> np.ndarray:
        return np.asarray(self.get(block.model, block.pooling, split)[:, block.layer, :], dtype=np.float32)


def _labels(entry) -> np.ndarray:
    return entry.table()["label"].to_numpy()


def run_train(cfg: ExperimentConfig, store, out: Path, *, progress: bool = True) -> pd.DataFrame:
    train_split, dev_split, test_split = cfg.data.splits[0], cfg.train.dev_split, cfg.train.test_split
    requests = train_requests(cfg)
    entries = {(r.model.name, r.split.name): open_features(store, r, config=cfg.source) for r in requests}
    _fusion_blocks(cfg, entries, train_split)  # named fusion inputs: a config error before any fitting
    by_model = {r.model.name: r for r in requests if r.split.name == train_split}
    skey = config_scores_key(cfg, requests)
    if not store.exists(skey):
        raise PipelineError(f"no scores for this config in {store.url}; run `{rerun_hint('score', cfg.source, store.url)}` first")
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
            rows.append(
                {
                    "dataset": cfg.data.name,
                    "head": head,
                    "models": models,
                    "layers": layers,
                    "pooling": pooling,
                    "split": split,
                    "accuracy": metrics[f"{split}_accuracy"],
                    "macro_f1": metrics[f"{split}_macro_f1"],
                    "n_params": n_params,
                    "fit_seconds": seconds,
                }
            )

    device = resolve_device(cfg.extract.device)  # probes fit where the features were computed
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

        df = probe_layers(
            load,
            y[train_split],
            y[dev_split],
            y[test_split],
            layers=range(n_layers + 1),
            Cs=cfg.train.Cs,
            seed=cfg.seed,
            on_result=keep,
            device=device,
        )
        nus = nu_table[(nu_table["model"] == model) & (nu_table["pooling"] == pooling)].set_index("layer")["variability"]
        df.insert(0, "pooling", pooling)
        df.insert(0, "model", model)
        df["nu"] = df["layer"].map(nus)
        layer_rows.append(df)
        for r in df.itertuples(index=False):
            add_rows("probe", model, str(r.layer), pooling, r._asdict(), int(r.n_params), float(r.fit_seconds))
        sel, top, best = select_layers(df, include_embeddings=cfg.train.include_embeddings)
        for head, r in (("selected", sel), ("top", top)):
            if r is not None:
                add_rows(head, model, str(int(r["layer"])), pooling, r.to_dict(), int(r["n_params"]), float(r["fit_seconds"]))
                src = head_file(f"probe:{model}:{int(r['layer'])}:{pooling}")
                dst = head_file(f"{head}:{model}:{pooling}")
                for suffix in ("safetensors", "json"):
                    blobs[f"{dst}.{suffix}"] = blobs[f"{src}.{suffix}"]
        selection.append(
            {
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
                "spearman_nu_accuracy": spearman_nu_accuracy(df["nu"].to_numpy(), df["test_accuracy"].to_numpy()),
            }
        )

    plans = plan_heads(cfg, requests, entries, train_split, nu_table)
    blobs.update(fit_fused(cfg, cache, plans, y, (train_split, dev_split, test_split), add_rows))

    train_df = pd.DataFrame(rows, columns=TRAIN_COLUMNS)
    layers_df = pd.concat(layer_rows, ignore_index=True)
    selection_df = pd.DataFrame(selection)
    lineage = make_lineage(cfg, requests, skey)
    key = _save_heads(store, cfg, blobs, train_df, lineage)
    chance = float(np.mean(y[test_split] == _majority(y[train_split])))
    _write_outputs(cfg, out, train_df, layers_df, selection_df, random_models, key, chance=chance, label_names=lineage["label_names"])
    return train_df


def _majority(y: np.ndarray):
    values, counts = np.unique(y, return_counts=True)
    return values[np.argmax(counts)]


def select_layers(df: pd.DataFrame, *, include_embeddings: bool = False):
    """(nu-selected row, top-layer row, dev-best row) of one model/pooling's per-layer probe table.

    Both choices look only at candidate layers (block outputs 1..L unless ``include_embeddings``)
    and never at test: the nu-selected layer has the lowest finite nu (computed on the training
    split), the dev-best the highest dev accuracy (the first on ties). None where no candidate has a finite nu.
    """
    cands = df[df["layer"].isin(list(candidate_layers(int(df["layer"].max()) + 1, include_embeddings)))]
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
    layer = probes["layers"].astype(int)
    cands = probes if include_embeddings else probes[layer > 0]
    order = cands.sort_values("dev_accuracy", ascending=False, kind="mergesort")
    return order.groupby("models", sort=False).head(1)


def _write_outputs(
    cfg,
    out: Path,
    train_df: pd.DataFrame,
    layers_df: pd.DataFrame,
    selection_df: pd.DataFrame,
    random_models,
    key: str,
    *,
    chance: float = float("nan"),
    label_names: list[str] | None = None,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train_df.to_parquet(out / "train.parquet", index=False)
    layers_df.to_parquet(out / "layers.parquet", index=False)
    selection_df.to_parquet(out / "selection.parquet", index=False)
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
    wide = train_df.pivot_table(index=["head", "models", "layers", "pooling"], columns="split", values="accuracy", sort=False).reset_index()
    wide = wide.rename(columns={"dev": "dev_accuracy", "test": "test_accuracy"})
    meta = train_df[train_df["split"] == "test"][["head", "models", "layers", "pooling", "macro_f1", "n_params", "fit_seconds"]]
    wide = wide.merge(meta.rename(columns={"macro_f1": "test_macro_f1"}), on=["head", "models", "layers", "pooling"], how="left")
    summary = wide[wide["head"].isin(["selected", "top", "fusion", "concat"])][
        ["head", "models", "layers", "pooling", "dev_accuracy", "test_accuracy", "test_macro_f1", "n_params", "fit_seconds"]
    ]
    best = best_probes(wide[wide["head"] == "probe"], include_embeddings=cfg.train.include_embeddings)
    among = "all hidden states 0..L" if cfg.train.include_embeddings else "block outputs 1..L"
    section = [f"## Train: heads on cached features (store entry {key[:12]})", ""]
    if random_models:
        section += [
            f"> **Random weights:** {', '.join(random_models)}; their heads show the pipeline works, not what a trained model does.",
            "",
        ]
    if label_names:
        section += ["Classes: " + ", ".join(f"{i} = {n}" for i, n in enumerate(label_names)), ""]
    section += [
        f"Selection protocol: every choice is made without the {cfg.train.test_split} split. A probe's C is chosen on "
        f"{cfg.train.dev_split}; the variability-selected layer is the lowest nu (on {cfg.score.split}) and the best layer "
        f"the highest {cfg.train.dev_split} accuracy, both among {among} (`train.include_embeddings`); "
        f"{cfg.train.test_split} accuracy is only reported. Chance (the {cfg.data.splits[0]} majority class on "
        f"{cfg.train.test_split}): {chance:.3f}. Full tables: train.parquet, layers.parquet, selection.parquet.",
        "",
        md_table(summary),
        "",
        "### Variability-selected layer vs top layer",
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
    write_section(out / "report.md", cfg.name, "## Train: heads on cached features", "\n".join(section))
    log.info("train: wrote %s/train.parquet, layers.png and the train section of report.md", out)
