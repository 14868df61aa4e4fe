"""train_seconds: fitting a probe and the fusion head on cached features, and head vs frozen parameters."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, result


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
    from stages.train.fusion import FusionHead

    cfg = load_config(ROOT / "configs" / "default.toml")
    fc = cfg.train.fusion
    models = {m.name: m for m in cfg.models}
    dims, used = [], []
    for text in fc.inputs:
        name = text.split(":")[0]
        dims.append(model_dims(resolve(models[name].source))[1])
        used.append(name)
    avg_idx = [fc.inputs.index(a) for a in fc.average]
    net = FusionHead(width=fc.width, hidden=fc.hidden, sigma=fc.sigma, dropout=fc.dropout)._build_net(dims, avg_idx, 2)
    head = int(sum(p.numel() for p in net.parameters()))
    frozen = {n: safetensors_params(Path(resolve(models[n].source).path) / "model.safetensors") for n in dict.fromkeys(used)}
    return {"fusion_head_params": head, "frozen_params": frozen, "ratio": round(head / sum(frozen.values()), 6)}


def train_seconds(cfg_path: Path, store_url: str, extract_seconds: float) -> dict:
    from pipeline.config import load_config
    from stages.entries import feature_requests
    from stages.entries import open_features
    from stages.train.fusion import FusionHead
    from stages.train.probes import fit_probe
    from pipeline.blocks import Block
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
    fc = cfg.train.fusion
    blocks = [Block.parse(t).resolved(n_layers[Block.parse(t).model]) for t in fc.inputs]
    avg = [str(Block.parse(t).resolved(n_layers[Block.parse(t).model])) for t in fc.average]
    inputs = {s: {str(b): cache.layer(b, s) for b in blocks} for s in (tr, dev)}

    probe_block = Block(cfg.models[0].name, n_layers[cfg.models[0].name], "mean")
    t0 = time.perf_counter()
    probe = fit_probe(cache.layer(probe_block, tr), y[tr], cache.layer(probe_block, dev), y[dev], Cs=cfg.train.Cs, seed=cfg.seed)
    probe_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    head = FusionHead(width=fc.width, sigma=fc.sigma, dropout=fc.dropout, hidden=fc.hidden, epochs=fc.epochs, lr=fc.lr,
                      batch_size=fc.batch_size, patience=fc.patience, seed=cfg.seed)
    head.fit(inputs[tr], y[tr], inputs[dev], y[dev], avg_keys=avg)
    fusion_s = time.perf_counter() - t0

    by_name = {r.model.name: r.spec for r in requests}
    fused_models = list(dict.fromkeys(b.model for b in blocks))
    frozen = {m: frozen_params(by_name[m]) for m in fused_models}
    frozen_probe = frozen_params(by_name[probe_block.model])
    details = {
        "config": str(cfg_path.relative_to(ROOT)) if cfg_path.is_relative_to(ROOT) else cfg_path.name,
        "train_rows": int(len(y[tr])), "probe": {"block": str(probe_block), "seconds": round(probe_s, 3), "params": int(probe.n_params),
                                                  "frozen_params": frozen_probe, "ratio": round(probe.n_params / frozen_probe, 6)},
        "fusion": {"inputs": list(fc.inputs), "seconds": round(fusion_s, 3), "params": int(head.n_params_), "frozen_params": frozen,
                   "epochs": fc.epochs},
        "default_config_shapes": default_head_vs_frozen(),
        "note": "LLMEmbed reports ~4% of a GPT-3 baseline's parameters; ratio here = fusion head params / the frozen "
                "models it reads (which never train)",
    }
    ratio = head.n_params_ / sum(frozen.values())
    details["extract_seconds_of_these_features"] = round(extract_seconds, 2)
    return {
        "train_seconds": result(probe_s + fusion_s, extract_seconds,
                                "seconds (probe + fusion head fit; reference = extracting the features); ratio = head params / frozen params",
                                details, ratio=ratio),
        "head_params": result(head.n_params_, sum(frozen.values()), "parameters (fusion head / frozen models it reads)",
                              {"frozen": frozen, "default_config_shapes": details["default_config_shapes"], "llmembed_claim": "~4%"}),
    }
