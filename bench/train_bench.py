"""train_seconds: fitting a probe and the fusion head on cached features, and head vs frozen parameters."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, median, paired_ratio, result, write_sst2_config


def safetensors_params(path: Path) -> int:
    """Parameter count from a safetensors header (no weights are read)."""
    with path.open("rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return int(sum(np.prod(v["shape"], dtype=np.int64) for k, v in header.items() if k != "__metadata__"))


def frozen_params(spec) -> int:
    if spec.kind == "tiny":
        from bench.extract_bench import load

        return int(sum(p.numel() for p in load(spec.source).loaded.model.parameters()))
    return safetensors_params(Path(spec.path) / "model.safetensors")


def default_head_vs_frozen() -> dict:
    """LLMEmbed's comparison for the embedded default (configs/default.toml), from shapes alone."""
    from pipeline.config import load_config
    from pipeline.models import resolve
    from stages.entries import model_dims
    from stages.entries.features import spec_family
    from stages.train.fused import DERIVED_LLAMA_LAYERS
    from stages.train.fusion import FusionHead

    cfg = load_config(ROOT / "configs" / "default.toml")
    fc = cfg.train.fusion
    models = {m.name: m for m in cfg.models}
    inputs, average = list(fc.inputs), list(fc.average)
    if not inputs:  # derived as the train stage derives them: real-weight models only
        for m in cfg.models:
            spec = resolve(m.source)
            if spec.random_init:
                continue
            k = DERIVED_LLAMA_LAYERS if spec_family(spec).name == "llama" else 1
            blocks = [f"{m.name}:{-1 - i}:mean" for i in range(k)]
            inputs += blocks
            average += blocks if k > 1 else []
    dims, used = [], []
    for text in inputs:
        name = text.split(":")[0]
        dims.append(model_dims(resolve(models[name].source))[1])
        used.append(name)
    avg_idx = [inputs.index(a) for a in average]
    net = FusionHead(width=fc.width, hidden=fc.hidden, sigma=fc.sigma, dropout=fc.dropout)._build_net(dims, avg_idx, 2)
    head = int(sum(p.numel() for p in net.parameters()))
    frozen = {n: safetensors_params(Path(resolve(models[n].source).path) / "model.safetensors") for n in dict.fromkeys(used)}
    return {"fusion_head_params": head, "frozen_params": frozen, "ratio": round(head / sum(frozen.values()), 6)}


def train_seconds(cfg_path: Path, store_url: str, extract_seconds: float) -> dict:
    from pipeline.blocks import Block
    from pipeline.config import load_config
    from stages.entries import feature_requests, open_features
    from stages.train.fused import base_blocks, make_head
    from stages.train.probes import fit_probe
    from stages.train.runner import FeatureCache
    from store import Store

    cfg = load_config(cfg_path)
    store = Store(store_url)
    tr, dev = cfg.data.splits[0], cfg.train.dev_split
    requests = [r for r in feature_requests(cfg) if r.split.name in (tr, dev)]
    entries = {(r.model.name, r.split.name): open_features(store, r, verify=False) for r in requests}
    cache = FeatureCache(entries)
    y = {s: entries[(cfg.models[0].name, s)].table()["label"].to_numpy() for s in (tr, dev)}
    n_layers = {m: int(entries[(m, tr)].description["n_layers"]) for m, _ in entries}
    blocks, avg_blocks = base_blocks(cfg, requests, entries, tr)  # as train plans the fusion head: named or derived
    if not blocks:
        raise ValueError(f"{cfg_path.name}: no block to fuse (no train.fusion.inputs and no real-weight model)")
    avg = [str(b) for b in avg_blocks]
    inputs = {s: {str(b): cache.layer(b, s) for b in blocks} for s in (tr, dev)}

    probe_block = Block(cfg.models[0].name, n_layers[cfg.models[0].name], "mean")
    t0 = time.perf_counter()
    probe = fit_probe(cache.layer(probe_block, tr), y[tr], cache.layer(probe_block, dev), y[dev], Cs=cfg.train.Cs, seed=cfg.seed)
    probe_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    head = make_head("fusion", cfg)  # configured exactly as train configures it
    head.fit(inputs[tr], y[tr], inputs[dev], y[dev], avg_keys=avg)
    fusion_s = time.perf_counter() - t0

    by_name = {r.model.name: r.spec for r in requests}
    fused_models = list(dict.fromkeys(b.model for b in blocks))
    frozen = {m: frozen_params(by_name[m]) for m in fused_models}
    frozen_probe = frozen_params(by_name[probe_block.model])
    details = {
        "config": str(cfg_path.relative_to(ROOT)) if cfg_path.is_relative_to(ROOT) else cfg_path.name,
        "train_rows": int(len(y[tr])),
        "probe": {
            "block": str(probe_block),
            "seconds": round(probe_s, 3),
            "params": int(probe.n_params),
            "frozen_params": frozen_probe,
            "ratio": round(probe.n_params / frozen_probe, 6),
        },
        "fusion": {
            "inputs": [str(b) for b in blocks],
            "seconds": round(fusion_s, 3),
            "params": int(head.n_params_),
            "frozen_params": frozen,
            "epochs": cfg.train.fusion.epochs,
        },
        "default_config_shapes": default_head_vs_frozen(),
        "note": "LLMEmbed reports ~4% of a GPT-3 baseline's parameters; ratio here = fusion head params / the frozen "
        "models it reads (which never train)",
    }
    ratio = head.n_params_ / sum(frozen.values())
    details["extract_seconds_of_these_features"] = round(extract_seconds, 2)
    return {
        "train_seconds": result(
            probe_s + fusion_s,
            extract_seconds,
            "seconds (probe + fusion head fit; reference = extracting the features); ratio = head params / frozen params",
            details,
            ratio=ratio,
        ),
        "head_params": result(
            head.n_params_,
            sum(frozen.values()),
            "parameters (fusion head / frozen models it reads)",
            {"frozen": frozen, "default_config_shapes": details["default_config_shapes"], "llmembed_claim": "~4%"},
        ),
    }


def fused_head_shapes(cfg_path: Path = ROOT / "configs" / "default.toml", n_classes: int = 2) -> dict:
    """Every fused head's trainable parameters for ``cfg_path``'s real models, from shapes alone (no features, no
    fitting), against the frozen parameters of the models it reads: LLMEmbed's ~4% comparison.

    Blocks as the train stage derives them: a llama's last 4 layers (averaged) plus every other real model's top
    layer; ``fusion_nu`` reads ``nu_layers`` layers of each model (which ones does not change a width); ``llmembed``
    the llama's last ``train.llmembed.layers`` layers (averaged) plus one block per other model.
    """
    from pipeline.config import load_config
    from pipeline.models import resolve
    from stages.entries import model_dims
    from stages.entries.features import spec_family
    from stages.train.fused import DERIVED_LLAMA_LAYERS, make_head

    cfg = load_config(cfg_path)
    real = {m.name: resolve(m.source) for m in cfg.models if not resolve(m.source).random_init}
    width = {m: model_dims(spec)[1] for m, spec in real.items()}
    llama = {m for m, spec in real.items() if spec_family(spec).name == "llama"}

    def blocks(k_llama: int, k_other: int) -> tuple[list[str], list[int], list[int]]:
        names, dims, avg = [], [], []
        for m in real:
            for _ in range(k_llama if m in llama else k_other):
                if m in llama:
                    avg.append(len(names))
                names.append(m)
                dims.append(width[m])
        return names, dims, avg

    fc = cfg.train.fusion
    plans = {
        "concat": blocks(DERIVED_LLAMA_LAYERS, 1),
        "concat_mlp": blocks(DERIVED_LLAMA_LAYERS, 1),
        "fusion_no_cooc": blocks(DERIVED_LLAMA_LAYERS, 1),
        "fusion": blocks(DERIVED_LLAMA_LAYERS, 1),
        "fusion_nu": blocks(fc.nu_layers, fc.nu_layers),
    }
    if llama:
        plans["llmembed"] = blocks(cfg.train.llmembed.layers, 1)
    frozen = {m: safetensors_params(Path(spec.path) / "model.safetensors") for m, spec in real.items()}
    out = {}
    for head, (names, dims, avg) in plans.items():
        if head == "concat":  # one logistic regression on the concatenated blocks
            params = (sum(dims) + 1) * (1 if n_classes == 2 else n_classes)
        else:
            net = make_head(head, cfg)._build_net(dims, avg, n_classes)
            params = int(sum(p.numel() for p in net.parameters() if p.requires_grad))
        read = sum(frozen[m] for m in dict.fromkeys(names))
        out[head] = {"blocks": len(names), "params": params, "frozen_params": read, "ratio": round(params / read, 6)}
    return {"config": str(cfg_path.relative_to(ROOT)), "n_classes": n_classes, "frozen_params": frozen, "heads": out}


def fused_heads(cfg_path: Path, store_url: str, extract_seconds: float, tmp: Path) -> dict:
    """Each fused head the train stage fits (its own ``plan_heads`` and ``fit_fused``), timed on cached features,
    with its trainable parameters against the frozen parameters of the models it reads.

    ``fused_heads/<head>``: the benchmark's config (quick: tiny random models, so the ratio is not LLMEmbed's;
    full: configs/default.toml); value = fit seconds, reference = extracting the config's features, ratio = head
    params / frozen params read. ``fused_heads``: configs/default.toml's real models from shapes alone, the head
    with the largest parameter ratio among every fused head (LLMEmbed reports ~4%).
    """
    from pipeline import orchestrate
    from pipeline.config import load_config
    from stages.entries import config_scores_key, load_scores, open_features, train_requests
    from stages.train.fused import fit_fused, plan_heads
    from stages.train.runner import FeatureCache
    from store import Store

    cfg = load_config(cfg_path)
    orchestrate.score(cfg, store_url, tmp / "fused-heads-out", progress=False)  # fusion_nu's nu table; cached afterwards
    store = Store(store_url)
    splits = (cfg.data.splits[0], cfg.train.dev_split, cfg.train.test_split)
    requests = train_requests(cfg)
    entries = {(r.model.name, r.split.name): open_features(store, r, verify=False) for r in requests}
    nu = load_scores(store, config_scores_key(cfg, requests))
    plans = plan_heads(cfg, requests, entries, splits[0], nu)
    first = requests[0].model.name
    y = {s: entries[(first, s)].table()["label"].to_numpy() for s in splits}
    rows: dict[str, dict] = {}
    fitted, blobs = fit_fused(cfg, FeatureCache(entries), plans, y, splits)
    peak = matmul_gflops()
    for r in fitted:  # one row per (head, dev/test split)
        rows.setdefault(r["head"], {"blocks": r["layers"].count(",") + 1, "params": r["n_params"], "seconds": r["fit_seconds"]})
        rows[r["head"]][f"{r['split']}_accuracy"] = r["accuracy"]
    spec = {r.model.name: r.spec for r in requests}
    frozen_of = {m: frozen_params(spec[m]) for m in dict.fromkeys(b.model for p in plans for b in p.blocks)}
    shapes = fused_head_shapes()
    config = str(cfg_path.relative_to(ROOT)) if cfg_path.is_relative_to(ROOT) else cfg_path.name
    out = {}
    for plan in plans:
        r = rows[plan.head]
        read = {m: frozen_of[m] for m in dict.fromkeys(b.model for b in plan.blocks)}
        details = {
            "config": config,
            "train_rows": int(len(y[splits[0]])),
            "fit_seconds": round(r["seconds"], 3),
            "params": int(r["params"]),
            "frozen_params": read,
            "blocks": r["blocks"],
            "dev_accuracy": round(float(r["dev_accuracy"]), 4),
            "test_accuracy": round(float(r["test_accuracy"]), 4),
            "default_config_shapes": shapes["heads"].get(plan.head),
            **compute_floor(plan.head, blobs, len(y[splits[0]]), len(y[splits[1]]), peak),
        }
        out[f"fused_heads/{plan.head}"] = result(
            r["seconds"],
            extract_seconds,
            "seconds (head fit on cached features; reference = extracting them); ratio = head params / frozen params read",
            details,
            ratio=r["params"] / sum(read.values()),
        )
    worst = max(shapes["heads"], key=lambda h: shapes["heads"][h]["ratio"])
    w = shapes["heads"][worst]
    out["fused_heads"] = result(
        w["params"],
        w["frozen_params"],
        "parameters (largest-ratio fused head / frozen models it reads; configs/default.toml real models, shapes)",
        {
            "head": worst,
            **shapes,
            "fit_on_bench_config": {h: {k: out[f"fused_heads/{h}"]["details"][k] for k in ("fit_seconds", "params")} for h in rows},
            "llmembed_claim": "~4% of a GPT-3 baseline's parameters",
        },
    )
    return out


def matmul_gflops(reps: int = 10) -> float:
    """Float32 GFLOP/s of a large matmul on this process's torch threads: what a dense head's arithmetic gets at best."""
    import torch

    a, b = torch.randn(1024, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * 1024 * 2048 * 2048 * reps / (time.perf_counter() - t0) / 1e9


def compute_floor(head: str, blobs: dict[str, bytes], train_rows: int, dev_rows: int, peak_gflops: float) -> dict:
    """For a torch head: the epochs it ran, the FLOPs of one epoch (every train row forward and backward, every
    dev row forward, counted by torch) and the seconds those epochs need at ``peak_gflops``; {} for other heads."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stages.entries import heads_format
    from stages.train.fused import head_class

    files = {heads_format.TENSORS_NAME: blobs[f"{head}.safetensors"], heads_format.META_NAME: blobs[f"{head}.json"]}
    meta = heads_format.unpack(files)[1]
    if "history" not in meta:
        return {}
    net = head_class(head).from_bytes(files).net_
    dims = [int(meta["block_dims"][name]) for name in meta["block_names"]]
    net.train()
    with FlopCounterMode(display=False) as step:
        net([torch.randn(train_rows, d) for d in dims]).sum().backward()
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as dev:
        net([torch.randn(dev_rows, d) for d in dims])
    epoch = step.get_total_flops() + dev.get_total_flops()
    epochs = len(meta["history"])
    return {
        "epochs_run": epochs,
        "epoch_flop": int(epoch),
        "matmul_gflops": round(peak_gflops, 1),
        "seconds_at_matmul_peak": float(f"{epochs * epoch / 1e9 / peak_gflops:.6g}"),
    }


# MiniLM over an SST-2 slice for the quick probe benchmark (full mode reads configs/default.toml's store).
PROBE_SECTIONS = """[extract]
max_length = 128
storage_dtype = "float16"
"""


def probe_config(plan, tmp: Path, cfg_path: Path, store_url: str) -> tuple[Path, str]:
    """Where probe_speedup reads features: the full run's default store, or a MiniLM slice it extracts."""
    if plan.probe_rows == 0:
        return cfg_path, store_url
    from bench.cached_bench import fill

    path = write_sst2_config(tmp / "bench-probes.toml", "bench-probes", plan.probe_rows, {"bert": "all-minilm-l6-v2"}, PROBE_SECTIONS)
    store = str(tmp / "probe-store")
    fill(path, store)
    return path, store


def probe_speedup(plan, cfg_path: Path, store_url: str) -> dict:
    """scikit-learn's lbfgs sweep vs the batched torch sweep over every layer of a model (mean pooling).

    Both are the train stage's ``probe_layers`` on the same in-memory features (all layers,
    every ``C`` of the config, dev selection, dev and test scoring), timed back to back.
    """
    from pipeline.blocks import Block
    from pipeline.config import load_config
    from stages.entries import open_features, train_requests
    from stages.train.probes import probe_layers
    from stages.train.runner import FeatureCache
    from store import Store

    cfg = load_config(cfg_path)
    store = Store(store_url)
    splits = (cfg.data.splits[0], cfg.train.dev_split, cfg.train.test_split)
    requests = [r for r in train_requests(cfg) if r.spec.source in plan.probe_models]
    entries = {(r.model.name, r.split.name): open_features(store, r, verify=False) for r in requests}
    out: dict = {}
    for model in dict.fromkeys(m for m, _ in entries):
        cache = FeatureCache(entries)
        y = [entries[(model, s)].table()["label"].to_numpy() for s in splits]
        n_layers = int(entries[(model, splits[0])].description["n_layers"])
        feats = {layer: tuple(cache.layer(Block(model, layer, "mean"), s) for s in splits) for layer in range(n_layers + 1)}
        del cache

        def sweep(solver: str, feats=feats, y=y):
            t0 = time.perf_counter()
            df = probe_layers(feats, *y, Cs=cfg.train.Cs, seed=cfg.seed, solver=solver)
            return time.perf_counter() - t0, df

        ref, new = [], []
        for _ in range(plan.probe_reps):
            t, ref_df = sweep("sklearn")
            ref.append(t)
            t, new_df = sweep("torch")
            new.append(t)
        Cs = sorted(cfg.train.Cs)
        steps = (ref_df["C"].map(Cs.index) - new_df["C"].map(Cs.index)).abs()
        family = requests[[r.model.name for r in requests].index(model)].family.name
        details = {
            "model": entries[(model, splits[0])].description["model"]["source"],
            "pooling": "mean",
            "layers": n_layers + 1,
            "Cs": Cs,
            "train_rows": int(len(y[0])),
            "sklearn_seconds": [round(x, 2) for x in ref],
            "batched_seconds": [round(x, 2) for x in new],
            "max_abs_dev_accuracy_diff": float((ref_df["dev_accuracy"] - new_df["dev_accuracy"]).abs().max()),
            "max_abs_test_accuracy_diff": float((ref_df["test_accuracy"] - new_df["test_accuracy"]).abs().max()),
            "same_C_layers": int((steps == 0).sum()),
            "max_C_steps_apart": int(steps.max()),
        }
        out[f"probe_speedup/{family}"] = result(
            median(ref), median(new), "seconds (scikit-learn lbfgs sweep / batched torch sweep)", details, ratio=paired_ratio(ref, new)
        )
    if out:
        worst = min(out, key=lambda k: out[k]["ratio"])
        out["probe_speedup"] = {**out[worst], "details": {**out[worst]["details"], "worst_of": sorted(out)}}
    return out


def train_stage_seconds(cfg_path: Path, store_url: str, tmp: Path) -> dict:
    """Wall time of `python -m pipeline train` (what `make train` runs) on a scored store, in a subprocess."""
    import subprocess
    import sys

    from bench.common import env
    from pipeline import orchestrate
    from pipeline.config import load_config

    out = tmp / "train-out"
    orchestrate.score(load_config(cfg_path), store_url, out, progress=False)
    cmd = [sys.executable, "-m", "pipeline", "train", "--config", str(cfg_path), "--store", store_url, "--out", str(out), "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=3600)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"train failed: {proc.stderr[-2000:]}")
    import pandas as pd

    fits = pd.read_parquet(out / "train.parquet")
    fits = fits[fits["split"] == "test"].groupby("head")["fit_seconds"].sum().round(2).to_dict()
    details = {
        "config": str(cfg_path.relative_to(ROOT)) if cfg_path.is_relative_to(ROOT) else cfg_path.name,
        "fit_seconds_by_head": fits,
        "goal": f"< {TRAIN_GOAL_SECONDS:g} s on 2 idle cores (configs/default.toml)",
    }
    return {"train_stage_seconds": result(seconds, TRAIN_GOAL_SECONDS, "seconds (wall, `python -m pipeline train`, subprocess)", details)}


TRAIN_GOAL_SECONDS = 60.0
