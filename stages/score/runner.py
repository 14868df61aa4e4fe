"""Score stage: variability and sparsity per model and layer, from store entries only.

Every shard is hashed from the bytes score reads (one read per shard file, checked against the
manifest; ``store verify`` stays the explicit full check), arrays are read in row pieces, and the
result tables are written to ``--out`` and recorded in the store as a ``scores`` entry
so teammates can reuse them.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd

from pipeline.blocks import candidate_layers
from pipeline.config import ExperimentConfig
from pipeline.data import load_splits
from pipeline.errors import PipelineError
from pipeline.models.families import RULE_TEXT
from pipeline.outputs import parquet_bytes, write_parquet
from pipeline.progress import tqdm
from stages.entries import TABLES, corrupt_features_error, feature_requests, load_keywords, open_features, scores_key
from stages.report import md_table, write_score_part
from stages.score import shards
from stages.score.plots import plot_sparsity, plot_variability
from stages.score.sparsity import keyword_mask, sparsity_tables, top_keyword_neurons
from stages.score.variability import _between_class_basis, _class_index, _result, lowest_nu_layer
from store import CorruptEntryError
from store.scan import KeptHandles

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


# local schedulers run every task in this process: the scan's open handles serve the second pass
LOCAL_SCHEDULERS = (None, "threads", "threading", "sync", "synchronous", "single-threaded")


def _tree(fn, parts: list, name: str, split_every: int = 8):
    """A delayed reduction of ``parts`` by ``fn`` in a tree of ``split_every`` (bounded memory)."""
    level = 0
    while len(parts) > 1:
        parts = [
            dask.delayed(fn, pure=False)(*parts[j : j + split_every], dask_key_name=f"{name}-{level}-{j}")
            for j in range(0, len(parts), split_every)
        ]
        level += 1
    return parts[0]


def score_entry(
    entry, request, keywords: list[str], *, rows_per_chunk: int, scheduler, include_embeddings: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Variability of every pooling and sparsity of one entry.

    Every shard is opened once and read front to back once by a scan task that hashes the bytes it
    reads and computes pass 1 of variability and the whole sparsity pass from them; a shard whose bytes
    differ from the manifest fails with a CorruptEntryError naming it. Pass 2 of variability needs the
    class means of the whole split and reads the hidden poolings again (one task per row chunk, every
    pooling at once) through the handles the scans kept open. Row tables are hashed as they are read.
    """
    table = entry.table(verify=True)
    if len(table) != entry.n_rows:
        raise CorruptEntryError(f"row count mismatch: the row tables hold {len(table)} rows, the manifest {entry.n_rows}")
    labels = table["label"].to_numpy()
    n = len(labels)
    ident = {"dataset": request.split.dataset, "split": request.split.name, "model": request.model.name}
    n_layers = entry.description.get("n_layers")
    poolings = tuple(request.extract.poolings)
    yidx, n_classes = _class_index(labels, None, n)
    classes = np.unique(labels)
    class_sizes = np.bincount(yidx, minlength=n_classes)
    counts = class_sizes.astype(np.float64)
    kw = keyword_mask(table["text"].tolist(), keywords)
    sources = entry.shard_sources()
    token = uuid.uuid4().hex
    keep = KeptHandles() if scheduler in LOCAL_SCHEDULERS else None
    try:
        scans = [
            dask.delayed(shards.scan_task, pure=False)(
                src,
                yidx[src["row_start"] : src["row_start"] + src["n_rows"]],
                kw[src["row_start"] : src["row_start"] + src["n_rows"]],
                n_classes,
                poolings,
                request.model.name,
                keep,
                dask_key_name=f"score-scan-{token}-{src['index']}",
            )
            for src in sources
        ]
        (first,) = dask.compute(_tree(shards.merge, scans, f"score-merge-{token}"), scheduler=scheduler)
        setups = set(first["setup"])
        if len(setups) > 1:
            raise CorruptEntryError(f"shards disagree on the firing thresholds and rule: {sorted(setups)}")
        ((thresholds, rule, _),) = setups
        means, spectra = {}, {}
        for p in poolings:
            s = first["moments"][p]
            mu = s[:n_classes] / counts[:, None, None]
            scale = np.sqrt(s[n_classes].sum(axis=-1) / n)
            spectra[p] = [_between_class_basis(mu[:, layer], scale[layer]) for layer in range(s.shape[1])]
            means[p] = (mu, np.stack([b for b, _, _ in spectra[p]]))
        means_task = dask.delayed(means, name=f"score-means-{token}")
        parts = []
        for src, regions in zip(sources, first["regions"]):
            a = src["row_start"]
            for lo in range(0, src["n_rows"], rows_per_chunk):
                hi = min(lo + rows_per_chunk, src["n_rows"])
                parts.append(
                    dask.delayed(shards.project_task, pure=False)(
                        src,
                        regions,
                        lo,
                        hi,
                        yidx[a + lo : a + hi],
                        means_task,
                        keep,
                        dask_key_name=f"score-project-{token}-{src['index']}-{lo}",
                    )
                )
        (sq,) = dask.compute(_tree(shards.add, parts, f"score-sum-{token}"), scheduler=scheduler)
    finally:
        if keep is not None:
            keep.close()
    by_pooling = {
        p: [_result(np.asarray(sq[p])[:, layer], counts, inv_s2, rank, n) for layer, (_, inv_s2, rank) in enumerate(spectra[p])]
        for p in poolings
    }
    ratios = first["norm_ratio"]
    if any(r is None for r in ratios):
        ratio_median = ratio_max = np.full(int(n_layers or 0) + 1, np.nan)
    else:
        r = np.concatenate(ratios, axis=0)
        ratio_median, ratio_max = np.median(r, axis=0), r.max(axis=0)
    var_rows = []
    for pooling in poolings:
        results = by_pooling[pooling]
        candidates = list(candidate_layers(len(results), include_embeddings))
        try:
            best = candidates[lowest_nu_layer([results[i] for i in candidates])]
        except ValueError:
            best = -1
        for layer, r in enumerate(results):
            var_rows.append(
                {
                    **ident,
                    "pooling": pooling,
                    "layer": layer,
                    "n_layers": n_layers or len(results) - 1,
                    "relative_depth": layer / max(len(results) - 1, 1),
                    "variability": r.nu,
                    "rank": r.rank,
                    "n_rows": r.n_rows,
                    "n_classes": r.n_classes,
                    "lowest": layer == best,
                    "norm_ratio_median": float(ratio_median[layer]) if layer < len(ratio_median) else float("nan"),
                    "norm_ratio_max": float(ratio_max[layer]) if layer < len(ratio_max) else float("nan"),
                    "random_init": bool(request.spec.random_init),
                }
            )
    layers, neurons = sparsity_tables(
        first["token_fires"], first["sentence_fires"], thresholds, rule, first["n_tokens"], class_sizes, kw, classes
    )
    layers.insert(0, "model", ident["model"])
    layers.insert(0, "split", ident["split"])
    layers.insert(0, "dataset", ident["dataset"])
    layers["relative_depth"] = (layers["layer"] + 1) / int(layers["layer"].max() + 1)
    layers["random_init"] = bool(request.spec.random_init)
    for col, val in reversed(list(ident.items())):
        neurons.insert(0, col, val)
    return pd.DataFrame(var_rows), layers, neurons


def run_score(cfg: ExperimentConfig, store, out: Path, *, scheduler: str = "threads", progress: bool = True) -> ScoreResult:
    split = load_splits(cfg.data, cfg.seed)[cfg.score.split]  # a carved split (data.dev_fraction) as extract cut it
    _check_train_split(split)
    requests = feature_requests(cfg, splits={split.name: split})
    keywords = load_keywords(cfg.score.keywords)
    # manifests and sizes now; every shard is hashed from the bytes score reads, every row table as it is parsed
    entries = [(r, open_features(store, r, config=cfg.source, verify="sizes")) for r in requests]
    var, spa, neu = [], [], []
    t0 = time.perf_counter()
    with dask_scheduler(scheduler) as sched:
        for r, entry in tqdm(entries, desc="score", unit="model", disable=not progress):
            try:
                v, s, n = score_entry(
                    entry,
                    r,
                    keywords,
                    rows_per_chunk=cfg.score.rows_per_chunk,
                    scheduler=sched,
                    include_embeddings=cfg.train.include_embeddings,
                )
            except CorruptEntryError as e:
                raise corrupt_features_error(store, r, e, cfg.source) from None
            var.append(v)
            spa.append(s)
            neu.append(n)
    result = ScoreResult(
        pd.concat(var, ignore_index=True),
        pd.concat(spa, ignore_index=True),
        pd.concat(neu, ignore_index=True),
        scores_key([r.key for r in requests], keywords, cfg.train.include_embeddings),
    )
    log.info("score: %d models in %.1f s", len(entries), time.perf_counter() - t0)
    write_outputs(result, cfg, out, [r for r, _ in entries], keywords)
    record_in_store(store, result, cfg, [r.key for r in requests])
    return result


def _check_train_split(split) -> None:
    if len(np.unique(split.labels)) < 2:
        raise PipelineError(f"score.split {split.name!r} has a single class; variability needs at least 2")


def record_in_store(store, result: ScoreResult, cfg: ExperimentConfig, feature_keys: list[str]) -> None:
    """Publish the tables as a write-once ``scores`` entry (a no-op if a teammate already did)."""
    if store.exists(result.key):
        return
    desc = {
        "kind": "scores",
        "name": f"{cfg.data.name}/{cfg.score.split}/scores",
        "features": sorted(feature_keys),
        "dataset": {"name": cfg.data.name, "split": cfg.score.split},
        "model": {"name": "+".join(m.name for m in cfg.models)},
    }
    writer = store.writer(result.key, desc, n_shards=0)
    for name, df in zip(TABLES, (result.variability, result.sparsity, result.neurons)):
        writer.write_file(name, parquet_bytes(df))
    writer.commit()


def write_outputs(result: ScoreResult, cfg: ExperimentConfig, out: Path, requests, keywords: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(result.variability, out / "variability.parquet")
    write_parquet(result.sparsity, out / "sparsity.parquet")
    write_parquet(result.neurons, out / "neurons.parquet")
    where = f"{cfg.data.name}/{cfg.score.split}"
    plot_variability(
        result.variability.rename(columns={"variability": "nu"}),
        out / "variability.png",
        title=f"{where}: hidden-state variability nu per layer (marked: lowest nu, the selected layer)",
    )
    plot_sparsity(result.sparsity, out / "sparsity.png", title=f"{where}: FFN activation sparsity per layer, one line per threshold")
    top = top_keyword_neurons(primary_threshold(result.neurons), cfg.score.top_neurons, min_fire_sentences=cfg.score.min_fires)
    write_parquet(top, out / "keyword_neurons.parquet")
    labels = np.asarray(requests[0].split.labels) if requests else np.array([])
    texts = list(requests[0].split.texts) if requests else []
    has_kw = keyword_mask(texts, keywords)
    words = np.array([len(t.split()) for t in texts], dtype=np.int64)
    write_score_part(out / "report.md", score_report(result, cfg, requests, top, keywords, labels, has_kw, words))
    log.info("score: wrote %s", ", ".join(str(out / n) for n in (*TABLES, "variability.png", "sparsity.png", "report.md")))


def primary_threshold(df: pd.DataFrame) -> pd.DataFrame:
    """Rows at each model's first (primary) threshold: the one the keyword and selectivity tables use."""
    if "threshold" not in df or df.empty:
        return df
    first = df.groupby("model", sort=False)["threshold"].transform("first")
    return df[df["threshold"] == first]


def score_report(
    result: ScoreResult,
    cfg: ExperimentConfig,
    requests,
    top: pd.DataFrame,
    keywords: list[str],
    labels: np.ndarray,
    has_kw: np.ndarray,
    words: np.ndarray,
) -> str:
    random_models = [f"{r.model.name} ({r.spec.source})" for r in requests if r.spec.random_init]
    var = result.variability
    spa = result.sparsity
    where = f"{cfg.data.name}/{cfg.score.split}"
    among = "all hidden states 0..L" if cfg.train.include_embeddings else "block outputs 1..L (not the embedding output 0)"
    best = var[var["lowest"]][["model", "pooling", "layer", "n_layers", "variability"]].rename(columns={"layer": "lowest_nu_layer"})
    finite = var[np.isfinite(var["variability"]) & (var["variability"] > 0)]
    spread = (
        finite.groupby(["model", "pooling"], sort=False)["variability"].agg(lambda v: float(v.max() / v.min())).rename("nu_max_over_min")
    )
    best = best.merge(spread.reset_index(), on=["model", "pooling"], how="left")
    parts = [f"# {cfg.name}: scores on {where}", ""]
    if random_models:
        parts += [
            f"> **Random weights:** {', '.join(random_models)} have randomly initialised weights; "
            "their numbers show the pipeline works, not what a trained model does.",
            "",
        ]
    parts += [
        "## Hidden-state variability (lower = the layer separates the classes better)",
        "",
        f"nu = (1/K) trace(Sigma_W pinv(Sigma_B)), Xie et al. 2022, on the {cfg.score.split} split; inf where the class means "
        f"coincide. The lowest-nu layer is chosen among {among} (`train.include_embeddings`); "
        "nu_max_over_min is the spread of finite nu over all layers.",
        "",
        md_table(best),
        "",
        "![variability](variability.png)",
        "",
    ]
    parts += _sink_section(var, requests)
    parts += _sparsity_section(spa, requests)
    parts += _keyword_section(result, cfg, top, keywords, labels, has_kw, words, random_models)
    return "\n".join(parts)


def _sink_section(var: pd.DataFrame, requests) -> list[str]:
    if "norm_ratio_median" not in var or var["norm_ratio_median"].isna().all():
        return []
    one = var.drop_duplicates(["model", "layer"])
    rows = []
    sinks = {r.model.name: r.sink for r in requests}
    for model, part in one.groupby("model", sort=False):
        part = part[part["norm_ratio_median"].notna()]
        if part.empty:
            continue
        worst = part.loc[part["norm_ratio_median"].idxmax()]
        rows.append(
            {
                "model": model,
                "sink": sinks.get(model, ""),
                "max_median_ratio": float(worst["norm_ratio_median"]),
                "at_layer": int(worst["layer"]),
                "median_over_layers": float(part["norm_ratio_median"].median()),
                "max_any_sentence": float(part["norm_ratio_max"].max()),
            }
        )
    return [
        "## Attention sinks: largest over median token norm",
        "",
        "Per sentence and layer, the largest hidden-state norm over the median one, among the tokens that enter the mean "
        "(special tokens and a prepended sink excluded); the median over sentences is shown for the worst layer. A value in "
        "the hundreds means one token (a sink) dominates the mean-pooled vector. `sink = auto` prepends the model's BOS to "
        "decoder models whose tokenizer adds none, so no real word becomes the sink. The ratio finds sinks in a pre-norm "
        "residual stream (Llama's layers below its final norm); a state taken after a normalisation (every layer of a "
        "post-norm encoder such as BERT, RoBERTa and MPNet, the last layer of Llama and T5) has each token rescaled to "
        "about the same norm, so its ratio stays near 1 (exactly 1 with untrained norm weights) whatever the attention does.",
        "",
        md_table(pd.DataFrame(rows)),
        "",
    ]


def _sparsity_section(spa: pd.DataFrame, requests) -> list[str]:
    group = ["model", "rule", "threshold"] if "rule" in spa else ["model", "threshold"]
    summary = (
        spa.groupby(group, sort=False)
        .agg(
            token_fire_fraction=("token_fire_fraction", "mean"),
            min_over_layers=("token_fire_fraction", "min"),
            max_over_layers=("token_fire_fraction", "max"),
            dead_fraction_mean=("dead_fraction", "mean"),
            dead_fraction_max=("dead_fraction", "max"),
        )
        .reset_index()
    )
    if "rule" in summary:
        summary["rule"] = summary["rule"].map(lambda r: RULE_TEXT.get(r, r).replace("|", "\\|"))  # a bare | splits a markdown cell
    kinds = {r.model.name: r.ffn_kind for r in requests if hasattr(r, "ffn_kind")}
    if kinds:
        summary.insert(1, "ffn", summary["model"].map(kinds))
    return [
        "## FFN activation sparsity",
        "",
        "A neuron fires on a token when a > t for ReLU and GELU FFNs (exact non-zero for ReLU at t = 0; for GELU t = 0 "
        "means a positive pre-activation) and when |a| > t for gated FFNs (SwiGLU/GeGLU: Llama's silu(gate) * up, whose "
        "sign carries no information). Every threshold is counted in the same extract pass (`extract.thresholds`). "
        "Dead = never fires on any counted token of the split. Token fire fraction: mean, min and max over layers.",
        "",
        md_table(summary),
        "",
        "![sparsity](sparsity.png)",
        "",
    ]


def class_concentration(top: pd.DataFrame, labels: np.ndarray, has_kw: np.ndarray, *, p_max: float) -> pd.DataFrame:
    """Per model, how many significant top keyword neurons fire most in each class, with the class
    shares and keyword rates to compare against; models without a significant neuron get zeros."""
    classes, counts = np.unique(labels, return_counts=True)
    rows = []
    for model, part in top.groupby("model", sort=False):
        sig = part[part["keyword_p_value"] < p_max]
        row = {"model": model, "neurons": len(sig)}
        for c in classes:
            row[f"top_class={c}"] = int((sig["top_class"] == c).sum())
        rows.append(row)
    share = {"model": "(class share of sentences)", "neurons": int(len(labels))}
    for c, n in zip(classes, counts):
        share[f"top_class={c}"] = round(float(n / len(labels)), 3)
    rows.append(share)
    if len(has_kw) == len(labels):
        rate = {"model": "(keyword rate in the class)", "neurons": int(has_kw.sum())}
        for c in classes:
            rate[f"top_class={c}"] = round(float(has_kw[labels == c].mean()), 3)
        rows.append(rate)
    return pd.DataFrame(rows)


def _keyword_section(
    result: ScoreResult,
    cfg: ExperimentConfig,
    top: pd.DataFrame,
    keywords: list[str],
    labels: np.ndarray,
    has_kw: np.ndarray,
    words: np.ndarray,
    random_models: list[str],
) -> list[str]:
    neurons = primary_threshold(result.neurons)
    if neurons.empty or "keyword_base_rate" not in neurons:
        return []
    base = float(neurons["keyword_base_rate"].iloc[0])
    tested = neurons[(neurons["n_fire_sentences"] >= cfg.score.min_fires) & neurons["keyword_p_value"].notna()]
    m = max(len(tested), 1)
    parts = [
        f"## Keyword neurons ({len(keywords)} keywords from {cfg.score.keywords})",
        "",
        f"Keywords match whole words of the lower-cased text (a hyphen joins words: `science-fiction` is not `science`). "
        f"Base rate: {base:.3f} of {cfg.score.split} sentences contain a keyword. Keyword score = share of the sentences that "
        "fire a neuron that contain a keyword; lift = score / base rate; p = one-sided hypergeometric P(at least that many "
        "keyword sentences among the neuron's sentences by chance). Neurons are ranked by p, at each model's first threshold, "
        f"among the {len(tested)} fired by at least {cfg.score.min_fires} sentences; p < {0.05 / m:.2g} survives a Bonferroni "
        "correction over them. Full table: keyword_neurons.parquet.",
        "",
    ]
    if has_kw.any() and (~has_kw).any():
        control = (
            f" The random-weight models ({', '.join(random_models)}) are a negative control: each of their neurons that "
            "survives does so without learned meaning (through which tokens a sentence has, and how many)."
            if random_models
            else ""
        )
        parts += [
            "Caveat: the test takes every sentence as equally likely to fire a neuron, but a longer sentence has more "
            f"tokens that can fire; here sentences with a keyword average {words[has_kw].mean():.1f} words, the others "
            f"{words[~has_kw].mean():.1f}.{control}",
            "",
        ]
    if len(labels):
        kw = class_concentration(top, labels, has_kw, p_max=0.05 / m) if len(top) else None
        if kw is not None:
            parts += [
                "Where the top keyword neurons fire most (the class with the highest fire rate, per neuron), against "
                "the share of each class in the split: a concentration on the class whose sentences carry the keywords "
                f"means the neurons track the topic. Only neurons that survive the Bonferroni correction (p < {0.05 / m:.2g}) "
                "count; `neurons` = 0 means no neuron of that model is a keyword neuron at its first threshold (a neuron that "
                "fires in nearly every sentence cannot be one).",
                "",
                md_table(kw),
                "",
            ]
    if len(top):
        head = top.sort_values(["keyword_p_value", "keyword_lift"], ascending=[True, False]).head(15)
        cols = [
            "model",
            "threshold",
            "layer",
            "neuron",
            "n_fire_sentences",
            "keyword_score",
            "keyword_base_rate",
            "keyword_lift",
            "keyword_p_value",
            "top_class",
            "sentence_fire_rate",
        ]
        parts += [md_table(head[[c for c in cols if c in head]]), ""]
    return parts
