"""Scores entries: the key of the variability/sparsity tables of a set of features, and their reader."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pandas as pd

from pipeline.config import ExperimentConfig
from pipeline.errors import PipelineError
from store import fingerprint

SCORES_VERSION = 2  # 2: per-threshold sparsity, keyword significance, selection among block outputs
TABLES = ("variability.parquet", "sparsity.parquet", "neurons.parquet")


def load_keywords(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"score.keywords: keyword file not found: {p}")
    return [w.strip() for w in p.read_text(encoding="utf-8").splitlines() if w.strip() and not w.startswith("#")]


def scores_key(feature_keys: list[str], keywords: list[str], include_embeddings: bool = False) -> str:
    """``include_embeddings`` decides which layer the tables mark as lowest-nu, so it is part of the key."""
    return fingerprint(
        {
            "kind": "scores",
            "version": SCORES_VERSION,
            "features": sorted(feature_keys),
            "keywords": hashlib.sha256("\n".join(keywords).encode()).hexdigest(),
            "include_embeddings": bool(include_embeddings),
        }
    )


def config_scores_key(cfg: ExperimentConfig, requests) -> str:
    """Key of the scores entry `make score` writes for these features and the config's keywords."""
    return scores_key(
        [r.key for r in requests if r.split.name == cfg.score.split], load_keywords(cfg.score.keywords), cfg.train.include_embeddings
    )


def load_scores(store, key: str) -> pd.DataFrame:
    """The variability table of a committed scores entry."""
    entry = store.open(key, verify=True)
    return pd.read_parquet(io.BytesIO(entry.read_file("variability.parquet")))
