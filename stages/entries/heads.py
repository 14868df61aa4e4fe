"""Heads entries: which features and scores a set of heads was trained on, and the key that follows."""

from __future__ import annotations

from pipeline.config import ExperimentConfig, to_dict
from pipeline.data import load_splits
from stages.entries.features import feature_requests
from stages.entries.scores import config_scores_key
from store import fingerprint

TRAIN_VERSION = 1


def head_file(name: str) -> str:
    """A store-safe file stem for a head name like 'probe:bert:3:mean'."""
    return name.replace(":", "-")


def train_requests(cfg: ExperimentConfig):
    """Feature requests for the train, dev and test splits of every configured model."""
    names = dict.fromkeys((cfg.data.splits[0], cfg.train.dev_split, cfg.train.test_split))
    splits = load_splits(cfg.data, cfg.seed)
    return feature_requests(cfg, splits={s: splits[s] for s in names})


def make_lineage(cfg: ExperimentConfig, requests, scores: str) -> dict:
    """What the heads were trained on, and all predict needs to run from the store alone: the full
    config (models and every extract setting) and the class names (None for integer labels)."""
    names = next((r.split.label_names for r in requests), None)
    return {
        "config": to_dict(cfg),
        "features": {f"{r.model.name}/{r.split.name}": r.key for r in requests},
        "scores": scores,
        "label_names": None if names is None else list(names),
    }


def heads_key(lineage: dict) -> str:
    return fingerprint(
        {
            "kind": "heads",
            "version": TRAIN_VERSION,
            "features": lineage["features"],
            "scores": lineage["scores"],
            "train": lineage["config"]["train"],
            "seed": lineage["config"]["seed"],
        }
    )


def expected_heads_key(cfg: ExperimentConfig) -> str:
    """The heads entry `make train` writes for this config and these exact features."""
    requests = train_requests(cfg)
    return heads_key(make_lineage(cfg, requests, config_scores_key(cfg, requests)))
