"""Label new text with a trained head: run each needed model only up to the layers it uses.

Features are computed by the same code as extract (same pooling, same storage dtype
rounding), so a head sees exactly the kind of input it was trained on.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pandas as pd
import torch

from pipeline.config import ExperimentConfig
from pipeline.data import Split
from pipeline.errors import PipelineError
from pipeline.blocks import Block
from pipeline.models import resolve
from stages.entries import FeatureRequest, expected_heads_key
from stages.extract import extract_shard, load_for_extract
from stages.train.fused import FUSED_HEADS, head_class
from stages.train.probes import probe_from_bytes

log = logging.getLogger(__name__)


def heads_entry(cfg: ExperimentConfig, store):
    """The heads entry `make train` wrote for this config and its current features (never a stale one)."""
    key = expected_heads_key(cfg)
    if not store.exists(key):
        raise PipelineError(f"no trained heads for {cfg.name!r} with its current features in {store.url}; "
                            f"run `make train CONFIG={cfg.source or '...'}` first")
    return store.open(key, verify=True)


def _head_blocks(name: str, entry) -> tuple[object, list[Block]]:
    index = json.loads(entry.read_file("heads.json"))
    if name not in index:
        raise PipelineError(f"--head {name!r} not found; available: {', '.join(sorted(index))}")
    stem = index[name]
    blobs = {"head.safetensors": entry.read_file(f"{stem}.safetensors"), "head.json": entry.read_file(f"{stem}.json")}
    if name in FUSED_HEADS:
        head = head_class(name).from_bytes(blobs)
        return head, [Block.parse(b) for b in head.block_names_]
    parts = name.split(":")
    train = pd.read_parquet(io.BytesIO(entry.read_file("train.parquet")))
    if parts[0] == "probe":
        _, model, layer, pooling = parts
    else:
        _, model, pooling = parts
        row = train[(train["head"] == parts[0]) & (train["models"] == model) & (train["pooling"] == pooling)].iloc[0]
        layer = row["layers"]
    return probe_from_bytes(blobs), [Block(model, int(layer), pooling)]


def _truncate(model: torch.nn.Module, family, keep: int) -> None:
    """Keep the first ``keep`` blocks: hidden state ``keep - 1`` is then unchanged, the rest is never computed."""
    parent_path, _, attr = family.blocks.rpartition(".")
    parent = model
    for part in filter(None, parent_path.split(".")):
        parent = getattr(parent, part)
    setattr(parent, attr, torch.nn.ModuleList(list(getattr(parent, attr))[:keep]))


def block_features(cfg: ExperimentConfig, blocks: list[Block], texts: list[str]) -> dict[str, np.ndarray]:
    """Pooled hidden states for ``blocks`` on ``texts``, computed like extract computes them."""
    out: dict[str, np.ndarray] = {}
    split = Split(cfg.data.name, "predict", tuple(texts), np.zeros(len(texts), dtype=np.int64), "<predict>")
    for model_name in dict.fromkeys(b.model for b in blocks):
        mcfg = cfg.model(model_name)
        spec = resolve(mcfg.source, mcfg.revision)
        loaded = load_for_extract(mcfg, spec, cfg.extract)()
        n_layers = len(loaded.family.block_list(loaded.model))
        deepest = max(n_layers if b.pooling == "pooler" else b.layer for b in blocks if b.model == model_name)
        if deepest < n_layers:
            _truncate(loaded.model, loaded.family, deepest + 1)
        request = FeatureRequest(split, mcfg, spec, cfg.extract)
        arrays = extract_shard(loaded, request, list(texts), 0, split.labels).arrays
        for b in blocks:
            if b.model == model_name:
                out[str(b)] = np.asarray(arrays[f"hidden/{b.pooling}"][:, b.layer, :], dtype=np.float32)
    return out


def predict_texts(cfg: ExperimentConfig, store, head_name: str, texts: list[str]):
    """(text, label, probabilities) for each text."""
    entry = heads_entry(cfg, store)
    head, blocks = _head_blocks(head_name, entry)
    feats = block_features(cfg, blocks, texts)
    inputs = feats if head_name in FUSED_HEADS else feats[str(blocks[0])]
    proba = head.predict_proba(inputs)
    classes = head.classes_ if hasattr(head, "classes_") else head[-1].classes_
    return [(t, classes[int(np.argmax(p))], p) for t, p in zip(texts, proba)]
