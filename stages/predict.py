"""Label new text with a trained head: run each needed model only up to the layers it uses.

Features are computed by the same code as extract (same pooling, same storage dtype
rounding), so a head sees exactly the kind of input it was trained on.
"""

from __future__ import annotations

import io
import json
import logging
import re

import numpy as np
import pandas as pd
import torch

from pipeline.blocks import Block
from pipeline.config import ExperimentConfig, from_record
from pipeline.data import Split
from pipeline.errors import DataError, PipelineError, rerun_hint
from pipeline.models import resolve
from stages.entries import FeatureRequest, expected_heads_key, heads_format
from stages.extract import extract_shard, load_for_extract
from stages.train.fused import FUSED_HEADS, head_class
from stages.train.probes import probe_from_bytes

log = logging.getLogger(__name__)


_KEY_HEAD = re.compile(r"([0-9a-f]{8,64})(?::(.+))?")


def heads_entry(cfg: ExperimentConfig, store):
    """The heads entry `make train` wrote for this config and its current features (never a stale one).

    When the data files are gone (the key needs their fingerprints), the newest heads entry of this
    experiment is used instead: it records everything predict needs."""
    try:
        key = expected_heads_key(cfg)
    except DataError as exc:
        name = f"{cfg.data.name}/heads/{cfg.name}"
        found = sorted((i for i in store.list() if i.complete and i.kind == "heads" and i.name == name), key=lambda i: -(i.created or 0))
        if not found:
            raise PipelineError(
                f"no trained heads for {cfg.name!r} in {store.url}, and its data cannot be read to look further ({exc})"
            ) from None
        log.info("data of %s not readable (%s); using its newest heads entry %s", cfg.name, exc, found[0].key[:12])
        return store.open(found[0].key, verify=True)
    if not store.exists(key):
        raise PipelineError(
            f"no trained heads for {cfg.name!r} with its current features in {store.url}; "
            f"run `{rerun_hint('train', cfg.source, store.url)}` first"
        )
    return store.open(key, verify=True)


def find_heads(store, head: str, cfg: ExperimentConfig | None = None):
    """(heads entry, head name) for `--head`: 'KEY[:NAME]' (a heads entry key or unique prefix; without
    NAME the head with the best dev accuracy) needs only the store; a plain NAME looks in `cfg`'s heads."""
    m = _KEY_HEAD.fullmatch(head)
    if m:
        entry = store.open(m[1], verify=True)
        if entry.description.get("kind") != "heads":
            raise PipelineError(
                f"--head {head}: entry {entry.key[:12]} is a {entry.description.get('kind')} entry, not heads; "
                f"`store ls --kind heads --store {store.url}` lists the heads entries"
            )
        return entry, m[2] or default_head(entry)
    if cfg is None:
        raise PipelineError(f"--head {head!r} is a head name: give --config too, or a heads entry key (`store ls --kind heads`)")
    return heads_entry(cfg, store), head


def default_head(entry) -> str:
    """The head with the best dev accuracy (ties: the first in train.parquet order)."""
    train = pd.read_parquet(io.BytesIO(entry.read_file("train.parquet")))
    dev = train[train["split"] == "dev"]
    row = dev.loc[dev["accuracy"].idxmax()]
    if row["head"] in FUSED_HEADS:
        return row["head"]
    if row["head"] == "probe":
        return f"probe:{row['models']}:{row['layers']}:{row['pooling']}"
    return f"{row['head']}:{row['models']}:{row['pooling']}"


def lineage(entry) -> dict:
    return json.loads(entry.read_file("lineage.json"))


def trained_config(entry, fallback: ExperimentConfig | None = None) -> ExperimentConfig:
    """The config the heads were trained with (models and every extract setting), from the entry itself."""
    record = lineage(entry).get("config")
    if record is None:
        if fallback is None:
            raise PipelineError(f"heads entry {entry.key[:12]} does not record its config; give --config")
        return fallback
    return from_record(record)


def label_names(entry) -> list[str] | None:
    return lineage(entry).get("label_names")


def _head_blocks(name: str, entry) -> tuple[object, list[Block]]:
    index = json.loads(entry.read_file("heads.json"))
    if name not in index:
        raise PipelineError(f"--head {name!r} not found; available: {', '.join(sorted(index))}")
    stem = index[name]
    blobs = heads_format.read_entry_head(entry, stem)
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


def predict_texts(cfg: ExperimentConfig | None, store, head_name: str, texts: list[str]):
    """(text, label, probabilities) for each text; labels are class names when the data had names."""
    return predict_table(cfg, store, head_name, texts)[1]


def predict_table(cfg: ExperimentConfig | None, store, head_name: str, texts: list[str]):
    """(classes in probability-column order, [(text, label, probabilities)]).

    Runs from the store alone: models, extract settings and class names come from the heads entry."""
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"predict: text {i + 1} is empty; extract refuses empty texts, and so does predict")
    entry, name = find_heads(store, head_name, cfg)
    tcfg = trained_config(entry, cfg)
    head, blocks = _head_blocks(name, entry)
    feats = block_features(tcfg, blocks, texts)
    inputs = feats if name in FUSED_HEADS else feats[str(blocks[0])]
    proba = head.predict_proba(inputs)
    classes = class_names(head, label_names(entry))
    return classes, [(t, classes[int(np.argmax(p))], p) for t, p in zip(texts, proba)]


def class_names(head, names: list[str] | None) -> list:
    """The head's classes, as names when the data had names."""
    classes = head.classes_ if hasattr(head, "classes_") else head[-1].classes_
    return [names[int(c)] for c in classes] if names is not None else [c.item() if hasattr(c, "item") else c for c in classes]
