"""Which blocks each fused head reads, the fitting of all of them, and the ablation table.

The heads answer "does fusion help, and which part of it?" on the same cached features:

- ``concat``: standardised blocks, logistic regression (the linear baseline);
- ``concat_mlp``: the fusion head's MLP on the concatenated blocks (no projection, no co-occurrence);
- ``fusion_no_cooc``: the fusion head without the co-occurrence term;
- ``fusion``: ours (:class:`stages.train.fusion.FusionHead`);
- ``fusion_nu``: ``fusion`` over each model's ``k`` lowest-nu layers (nu from the score stage on
  the train split) instead of a hand-picked "last k";
- ``llmembed``: the reference head (:class:`stages.train.llmembed.LLMEmbedHead`).

Which fused variant to trust (``fusion``, ``fusion_nu`` or ``llmembed``) is chosen on dev
accuracy only, and set against the single-layer probe chosen on dev the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.blocks import Block, among_candidates
from pipeline.head_params import FUSION_CONSTRAINTS, LLMEMBED_CONSTRAINTS
from stages.entries import heads_format
from stages.train.metrics import metric_rows

log = logging.getLogger(__name__)

FUSED_HEADS = ("concat", "concat_mlp", "fusion_no_cooc", "fusion", "fusion_nu", "llmembed")
SELECTABLE = ("fusion", "fusion_nu", "llmembed")
DERIVED_LLAMA_LAYERS = 4
MARGIN = 0.01  # the fused head must beat the best single probe by this much test accuracy to count as a win


@dataclass(frozen=True)
class FusedPlan:
    """The blocks one fused head reads and those among them that are averaged."""

    head: str
    blocks: tuple  # of runner.Block, resolved
    average: tuple = ()


def _top(model: str, n_layers: int, pooling: str, k: int = 1):
    return [Block(model, n_layers - i, pooling) for i in range(min(k, n_layers + 1))]


def base_blocks(cfg, requests, entries, train_split: str):
    """(blocks, average) of the ``fusion`` head: named in the config, or derived from the real-weight models.

    Derived: every model with real weights, in config order; a llama contributes its last 4 layers
    mean-pooled (averaged, as LLMEmbed does), any other model its top layer mean-pooled (the pooling
    sentence encoders such as MiniLM and MPNet were trained with). Random-weight models are left out.
    """

    def n_layers(model: str) -> int:
        return int(entries[(model, train_split)].description["n_layers"])

    fc = cfg.train.fusion
    if fc.inputs:
        blocks = [Block.parse(t).resolved(n_layers(Block.parse(t).model)) for t in fc.inputs]
        avg = [Block.parse(t).resolved(n_layers(Block.parse(t).model)) for t in fc.average]
        return blocks, avg
    blocks, avg = [], []
    for r in requests:
        if r.split.name != train_split or r.spec.random_init:
            continue
        if r.family.name == "llama":
            layers = _top(r.model.name, n_layers(r.model.name), "mean", DERIVED_LLAMA_LAYERS)
            blocks += layers
            avg += layers
        else:
            blocks += _top(r.model.name, n_layers(r.model.name), "mean")
    return blocks, avg


def plan_heads(cfg, requests, entries, train_split: str, nu_table: pd.DataFrame | None) -> list[FusedPlan]:
    """Every fused head this config can fit, with its resolved blocks; empty when nothing can be fused."""
    blocks, avg = base_blocks(cfg, requests, entries, train_split)
    if not blocks:
        log.info("train: no real-weight model to fuse (and no train.fusion.inputs): fused heads skipped")
        return []
    plans = [
        FusedPlan("concat", tuple(blocks)),
        FusedPlan("concat_mlp", tuple(blocks)),
        FusedPlan("fusion_no_cooc", tuple(blocks), tuple(avg)),
        FusedPlan("fusion", tuple(blocks), tuple(avg)),
    ]
    models = list(dict.fromkeys(b.model for b in blocks))
    averaged = {b.model for b in avg}
    if nu_table is not None and cfg.score.split == train_split:
        nu_blocks, nu_avg = [], []
        for model in models:
            pooling = next((b.pooling for b in blocks if b.model == model and b.pooling != "pooler"), "mean")
            rows = nu_table[(nu_table["model"] == model) & (nu_table["pooling"] == pooling)]
            rows = among_candidates(rows[np.isfinite(rows["variability"])], cfg.train.include_embeddings)  # as layer selection
            rows = rows.sort_values(["variability", "layer"])
            chosen = [Block(model, int(layer), pooling) for layer in sorted(rows["layer"].head(cfg.train.fusion.nu_layers))]
            nu_blocks += chosen
            if model in averaged:
                nu_avg += chosen
        if nu_blocks:
            plans.append(FusedPlan("fusion_nu", tuple(nu_blocks), tuple(nu_avg)))
    else:
        log.warning("train: fusion_nu skipped: nu must come from the training split, but score.split is %r", cfg.score.split)
    llm = llmembed_blocks(cfg, requests, entries, train_split, models, averaged)
    if llm is not None:
        plans.append(llm)
    return plans


def llmembed_blocks(cfg, requests, entries, train_split, models, averaged) -> FusedPlan | None:
    """The reference head's inputs: the llama's last layers (mean), then each other fused model's
    pooler output where it was stored (a trained pooler), else its top-layer first token."""
    fams = {r.model.name: r.family.name for r in requests if r.split.name == train_split}
    llama = next((m for m in models if m in averaged and fams.get(m) == "llama"), None)
    llama = llama or next((m for m in models if fams.get(m) == "llama"), None)
    if llama is None:
        log.info("train: llmembed skipped: it needs a llama-family model among the fused models")
        return None
    n = int(entries[(llama, train_split)].description["n_layers"])
    layers = _top(llama, n, "mean", cfg.train.llmembed.layers)
    others = []
    for model in models:
        if model == llama:
            continue
        entry = entries[(model, train_split)]
        if "hidden/pooler" in entry.datasets():
            others.append(Block(model, 0, "pooler"))
        else:
            others += _top(model, int(entry.description["n_layers"]), "first")
    return FusedPlan("llmembed", tuple(layers + others), tuple(layers))


def make_head(name: str, cfg):
    """An unfitted head for ``name``, configured from ``cfg.train`` (its fields are the heads' own parameters)."""
    from stages.train.concat import ConcatHead
    from stages.train.fusion import FusionHead
    from stages.train.llmembed import LLMEmbedHead

    if name == "concat":
        return ConcatHead(Cs=cfg.train.Cs, seed=cfg.seed)
    if name == "llmembed":
        params = {k: getattr(cfg.train.llmembed, k) for k in LLMEMBED_CONSTRAINTS}
        return LLMEmbedHead(**params, seed=cfg.seed)
    switches = {"fusion": (True, True), "fusion_nu": (True, True), "fusion_no_cooc": (False, True), "concat_mlp": (False, False)}
    cooc, proj = switches[name]
    params = {k: getattr(cfg.train.fusion, k) for k in FUSION_CONSTRAINTS}
    return FusionHead(**params, seed=cfg.seed, cooccurrence=cooc, projection=proj)


def head_class(name: str):
    """The class that loads a saved fused head called ``name``."""
    from stages.train.concat import ConcatHead
    from stages.train.fusion import FusionHead
    from stages.train.llmembed import LLMEmbedHead

    return {"concat": ConcatHead, "llmembed": LLMEmbedHead}.get(name, FusionHead)


def fit_fused(cfg, cache, plans: list[FusedPlan], y: dict, split_names) -> tuple[list[dict], dict[str, bytes]]:
    """Fit every planned head on cached features; its dev/test rows of the train table and its files."""
    from stages.train.probes import evaluate

    train_split, dev_split, test_split = split_names
    rows: list[dict] = []
    out: dict[str, bytes] = {}
    for plan in plans:
        inputs = {s: {str(b): cache.layer(b, s) for b in plan.blocks} for s in split_names}
        head = make_head(plan.head, cfg)
        t0 = time.perf_counter()
        if plan.head == "concat":
            head.fit(inputs[train_split], y[train_split], inputs[dev_split], y[dev_split])
        else:
            head.fit(inputs[train_split], y[train_split], inputs[dev_split], y[dev_split], avg_keys=[str(b) for b in plan.average])
        seconds = time.perf_counter() - t0
        metrics = {
            f"{split}_{k}": v for split, s in (("dev", dev_split), ("test", test_split)) for k, v in evaluate(head, inputs[s], y[s]).items()
        }
        models = "+".join(dict.fromkeys(b.model for b in plan.blocks))
        layers = ",".join(f"{b.model}:{'pooler' if b.pooling == 'pooler' else b.layer}" for b in plan.blocks)
        pools = ",".join(sorted({b.pooling for b in plan.blocks}))
        rows += metric_rows(cfg.data.name, plan.head, models, layers, pools, metrics, int(head.n_params_), float(seconds))
        out.update(heads_format.entry_files(plan.head, head.to_bytes()))
        log.info(
            "%s head: dev %.4f test %.4f (%d params, %.1f s)",
            plan.head,
            metrics["dev_accuracy"],
            metrics["test_accuracy"],
            head.n_params_,
            seconds,
        )
    return rows, out


def ablation(train_df: pd.DataFrame, *, include_embeddings: bool = False) -> tuple[pd.DataFrame, dict | None]:
    """The ablation table (one row per fused head, dev and test side by side) and the dev-only verdict.

    The verdict compares the fused variant with the best dev accuracy (among ``SELECTABLE``) with the
    single-layer probe with the best dev accuracy (any model, pooling and candidate layer: block
    outputs, plus the embedding output with ``include_embeddings``); ties keep the first in table
    order. None when no fused head was fitted.
    """
    wide = train_df.pivot_table(
        index=["head", "models", "layers", "pooling", "n_params", "fit_seconds"], columns="split", values="accuracy", aggfunc="first"
    ).reset_index()
    fused = wide[wide["head"].isin(FUSED_HEADS)].copy()
    if fused.empty:
        return fused, None
    fused["order"] = fused["head"].map(FUSED_HEADS.index)
    fused = fused.sort_values("order").drop(columns="order")
    table = fused[["head", "n_params", "fit_seconds", "dev", "test"]].rename(columns={"dev": "dev_accuracy", "test": "test_accuracy"})
    table.insert(1, "blocks", fused["layers"].str.count(",") + 1)
    pick = fused[fused["head"].isin(SELECTABLE)]
    probes = among_candidates(wide[wide["head"] == "probe"], include_embeddings, layer="layers", model="models")
    if pick.empty or probes.empty:
        return table.reset_index(drop=True), None
    best_fused = pick.loc[pick["dev"].idxmax()]
    best_probe = probes.loc[probes["dev"].idxmax()]
    gain = float(best_fused["test"] - best_probe["test"])
    verdict = {
        "fused_head": best_fused["head"],
        "fused_dev": float(best_fused["dev"]),
        "fused_test": float(best_fused["test"]),
        "probe": f"{best_probe['models']}:{best_probe['layers']}:{best_probe['pooling']}",
        "probe_dev": float(best_probe["dev"]),
        "probe_test": float(best_probe["test"]),
        "gain": gain,
        "wins": gain >= MARGIN,
    }
    return table.reset_index(drop=True), verdict


def ablation_section(train_df: pd.DataFrame, *, include_embeddings: bool = False) -> list[str]:
    """Markdown lines for report.md: the ablation table and the plain verdict."""
    from stages.report import md_table

    table, verdict = ablation(train_df, include_embeddings=include_embeddings)
    if table.empty:
        return []
    lines = [
        "### Fusion ablation: what each part adds",
        "",
        "concat: standardised blocks, logistic regression; concat_mlp: the fusion MLP on the concatenated blocks; "
        "fusion_no_cooc: fusion without the co-occurrence term; fusion: ours; fusion_nu: fusion over each model's "
        "lowest-nu layers (train split); llmembed: the reference head (logits into the loss, early stopping on dev).",
        "",
        md_table(table),
        "",
    ]
    if verdict is not None:
        v = verdict
        said = (
            f"**Fusion helps:** the dev-chosen fused head `{v['fused_head']}` beats the dev-chosen single probe by "
            f"{100 * v['gain']:.1f} points of test accuracy."
            if v["wins"]
            else f"**Fusion does not help here:** the dev-chosen fused head `{v['fused_head']}` is "
            f"{100 * v['gain']:+.1f} points of test accuracy against the dev-chosen single probe, short of the "
            f"{100 * MARGIN:.0f}-point margin."
        )
        lines += [
            f"Chosen on dev only: fused `{v['fused_head']}` (dev {v['fused_dev']:.4f}, test {v['fused_test']:.4f}) vs "
            f"probe `{v['probe']}` (dev {v['probe_dev']:.4f}, test {v['probe_test']:.4f}). {said}",
            "",
        ]
    return lines
