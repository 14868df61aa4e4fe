"""Score stage: variability and sparsity per model and layer, from store entries only.

Every entry is verified before it is read, arrays are read lazily in row chunks, and the
result tables are written to ``--out`` and recorded in the store as a ``scores`` entry
so teammates can reuse them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd

from tqdm.auto import tqdm

from pipeline.config import ExperimentConfig
from pipeline.data import load_split
from pipeline.errors import PipelineError
from pipeline.outputs import write_atomic
from stages.entries import TABLES, feature_requests, load_keywords, open_features, scores_key
from stages.report import md_table
from stages.score.plots import plot_sparsity, plot_variability
from stages.score.sparsity import SparsityPlan, keyword_mask, top_keyword_neurons
from stages.score.variability import VariabilityPlan, lowest_nu_layer

log = logging.getLogger(__name__)



@dataclass
class ScoreResult:
    variability: pd.DataFrame
    sparsity: pd.DataFrame
    neurons: pd.DataFrame
    key: str


@contextlib.contextmanager
def dask_scheduler(spec: str):
    """A scheduler for ``dask.compute``: local threads by default, or a distributed client."""
    if spec.startswith(("tcp://", "tls://")):
        from distributed import Client

        try:
            client = Client(spec, timeout="10s", set_as_default=False)
        except OSError as e:
            raise PipelineError(f"score.scheduler: cannot reach dask scheduler at {spec} ({e})") from None
        try:
            yield client
        finally:
            client.close()
    else:
        yield spec


def score_entry(entry, request, keywords: list[str], *, rows_per_chunk: int, scheduler) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    table = entry.table()
    labels = table["label"].to_numpy()
    ident = {"dataset": request.split.dataset, "split": request.split.name, "model": request.model.name}
    n_layers = entry.description.get("n_layers")
    if "max" not in request.extract.ffn_poolings:
        raise PipelineError(f"{ident['model']}: sparsity needs ffn max pooling; add 'max' to extract.ffn_poolings and re-extract")
    # Two dask.compute calls read every shard at most twice: pass 1 of variability for every
    # pooling, then pass 2 of every pooling fused with the sparsity pass over ffn/max.
    poolings = list(request.extract.poolings)
    plan = VariabilityPlan({p: entry.array(f"hidden/{p}", rows_per_chunk=rows_per_chunk) for p in poolings}, labels)
    attrs = entry.shard_attrs("ffn/fire_count")
    sparsity = SparsityPlan(
        entry.per_shard("ffn/fire_count"), [a["n_tokens"] for a in attrs],
        entry.array("ffn/max", rows_per_chunk=rows_per_chunk), labels,
        keyword_mask(table["text"].tolist(), keywords), request.model.threshold)
    sums, = dask.compute(plan.first_pass(), scheduler=scheduler)
    sq, fires = dask.compute(plan.second_pass(sums), sparsity.lazy(), scheduler=scheduler)
    by_pooling = plan.results(sq)
    var_rows = []
    for pooling in poolings:
        results = by_pooling[pooling]
        try:
            best = lowest_nu_layer(results)
        except ValueError:
            best = -1
        for layer, r in enumerate(results):
            var_rows.append({**ident, "pooling": pooling, "layer": layer, "n_layers": n_layers or len(results) - 1,
                             "relative_depth": layer / max(len(results) - 1, 1), "variability": r.nu, "rank": r.rank,
                             "n_rows": r.n_rows, "n_classes": r.n_classes, "lowest": layer == best,
                             "random_init": bool(request.spec.random_init)})
    layers, neurons = sparsity.finish(fires)
    n = len(layers)
    layers.insert(0, "model", ident["model"])
    layers.insert(0, "split", ident["split"])
    layers.insert(0, "dataset", ident["dataset"])
    layers["relative_depth"] = (layers["layer"] + 1) / n
    layers["random_init"] = bool(request.spec.random_init)
    for col, val in reversed(list(ident.items())):
        neurons.insert(0, col, val)
    return pd.DataFrame(var_rows), layers, neurons


def run_score(cfg: ExperimentConfig, store, out: Path, *, scheduler: str = "threads", progress: bool = True) -> ScoreResult:
    split = load_split(cfg.data, cfg.score.split)
    _check_train_split(split)
    requests = feature_requests(cfg, splits={split.name: split})
    keywords = load_keywords(cfg.score.keywords)
    entries = [(r, open_features(store, r, config=cfg.source)) for r in requests]
    var, spa, neu = [], [], []
    t0 = time.perf_counter()
    with dask_scheduler(scheduler) as sched:
        for r, entry in tqdm(entries, desc="score", unit="model", disable=not progress):
            v, s, n = score_entry(entry, r, keywords, rows_per_chunk=cfg.score.rows_per_chunk, scheduler=sched)
            var.append(v)
            spa.append(s)
            neu.append(n)
    result = ScoreResult(pd.concat(var, ignore_index=True), pd.concat(spa, ignore_index=True), pd.concat(neu, ignore_index=True),
                         scores_key([r.key for r in requests], keywords))
    log.info("score: %d models in %.1f s", len(entries), time.perf_counter() - t0)
    write_outputs(result, cfg, out, [r for r, _ in entries], keywords)
    record_in_store(store, result, cfg, [r.key for r in requests])
    return result


def _check_train_split(split) -> None:
    if len(np.unique(split.labels)) < 2:
        raise PipelineError(f"score.split {split.name!r} has a single class; variability needs at least 2")


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def record_in_store(store, result: ScoreResult, cfg: ExperimentConfig, feature_keys: list[str]) -> None:
    """Publish the tables as a write-once ``scores`` entry (a no-op if a teammate already did)."""
    if store.exists(result.key):
        return
    desc = {"kind": "scores", "name": f"{cfg.data.name}/{cfg.score.split}/scores", "features": sorted(feature_keys),
            "dataset": {"name": cfg.data.name, "split": cfg.score.split}, "model": {"name": "+".join(m.name for m in cfg.models)}}
    writer = store.writer(result.key, desc, n_shards=0)
    for name, df in zip(TABLES, (result.variability, result.sparsity, result.neurons)):
        writer.write_file(name, parquet_bytes(df))
    writer.commit()


def write_outputs(result: ScoreResult, cfg: ExperimentConfig, out: Path, requests, keywords: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.variability.to_parquet(out / "variability.parquet", index=False)
    result.sparsity.to_parquet(out / "sparsity.parquet", index=False)
    result.neurons.to_parquet(out / "neurons.parquet", index=False)
    plot_variability(result.variability.rename(columns={"variability": "nu"}), out / "variability.png")
    plot_sparsity(result.sparsity, out / "sparsity.png")
    top = top_keyword_neurons(result.neurons, cfg.score.top_neurons, min_fire_sentences=cfg.score.min_fires)
    top.to_parquet(out / "keyword_neurons.parquet", index=False)
    write_atomic(out / "report.md", score_report(result, cfg, requests, top, len(keywords)))
    log.info("score: wrote %s", ", ".join(str(out / n) for n in (*TABLES, "variability.png", "sparsity.png", "report.md")))


def score_report(result: ScoreResult, cfg: ExperimentConfig, requests, top: pd.DataFrame, n_keywords: int) -> str:
    random_models = [f"{r.model.name} ({r.spec.source})" for r in requests if r.spec.random_init]
    var = result.variability
    best = var[var["lowest"]][["model", "pooling", "layer", "n_layers", "variability"]].rename(columns={"layer": "lowest_nu_layer"})
    spa = result.sparsity
    summary = spa.groupby("model", sort=False).agg(threshold=("threshold", "first"), token_fire_fraction=("token_fire_fraction", "mean"),
                                                   dead_fraction_mean=("dead_fraction", "mean"), dead_fraction_max=("dead_fraction", "max")).reset_index()
    parts = [f"# {cfg.name}: scores on {cfg.data.name}/{cfg.score.split}", ""]
    if random_models:
        parts += [f"> **Random weights:** {', '.join(random_models)} have randomly initialised weights; "
                  "their numbers show the pipeline works, not what a trained model does.", ""]
    parts += ["## Hidden-state variability (lower = the layer separates the classes better)", "",
              "nu = (1/K) trace(Sigma_W pinv(Sigma_B)), Xie et al. 2022; inf where the class means coincide.", "",
              md_table(best), "", "![variability](variability.png)", "",
              "## FFN activation sparsity", "",
              "A neuron fires on a token when its activation is > threshold (exact for ReLU; a stated rule for GELU/SiLU). "
              "Dead = never fires on any real token of the split.", "",
              md_table(summary), "", "![sparsity](sparsity.png)", ""]
    if len(top):
        parts += [f"## Keyword neurons ({n_keywords} keywords from {cfg.score.keywords})", "",
                  f"Top {cfg.score.top_neurons} neurons per layer by keyword score (share of the sentences that fire the neuron "
                  f"that contain a keyword), among neurons fired by at least {cfg.score.min_fires} sentences; "
                  f"{int(result.neurons['keyword_score'].notna().sum())} neurons scored. Full table: keyword_neurons.parquet.", ""]
        head = top.sort_values("keyword_score", ascending=False).head(15)
        parts += [md_table(head[["model", "layer", "neuron", "keyword_score", "sentence_fire_rate", "n_fire_sentences"]]), ""]
    return "\n".join(parts)
