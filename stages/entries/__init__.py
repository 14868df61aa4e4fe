"""The three kinds of store entry the stages share (features, scores, heads): requests, keys, readers.

Every stage imports this and the foundation (``pipeline.config``, ``data``, ``models``,
``store``); no stage imports another stage's runner or the driver.
"""

from stages.entries.features import (
    FORMAT_VERSION,
    FeatureRequest,
    corrupt_features_error,
    feature_requests,
    model_dims,
    open_features,
    open_verified,
)
from stages.entries.heads import TRAIN_VERSION, expected_heads_key, head_file, heads_key, make_lineage, train_requests
from stages.entries.scores import SCORES_VERSION, TABLES, config_scores_key, load_keywords, load_scores, scores_key

__all__ = [
    "FORMAT_VERSION",
    "SCORES_VERSION",
    "TABLES",
    "TRAIN_VERSION",
    "FeatureRequest",
    "config_scores_key",
    "corrupt_features_error",
    "expected_heads_key",
    "feature_requests",
    "head_file",
    "heads_key",
    "load_keywords",
    "load_scores",
    "make_lineage",
    "model_dims",
    "open_features",
    "open_verified",
    "scores_key",
    "train_requests",
]
