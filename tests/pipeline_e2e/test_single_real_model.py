"""A config with one real model and no [train.fusion] section runs every stage; fusion inputs are derived."""

from __future__ import annotations

import pandas as pd
import pytest
from config_factory import KEYWORDS, SST2

from pipeline.cli import main


@pytest.mark.slow
def test_minilm_only_config_without_fusion_section_runs_extract_score_train(config_file, tmp_path):
    cfg = config_file(
        {
            "name": "minilm-only",
            "seed": 0,
            "data": {"name": "sst2", "path": str(SST2), "splits": ["train", "dev", "test"], "limit": 60},
            "models": [{"name": "bert", "source": "all-minilm-l6-v2"}],
            "extract": {"max_length": 32},
            "score": {"keywords": str(KEYWORDS)},
        }
    )
    store, out = tmp_path / "store", tmp_path / "out"
    for stage in ("extract", "score", "train"):
        assert main([stage, "--config", str(cfg), "--store", str(store), *(["--out", str(out)] if stage != "extract" else []), "-q"]) == 0
    train = pd.read_parquet(out / "train.parquet")
    fusion = train[train["head"] == "fusion"]
    assert len(fusion) and set(fusion["models"]) == {"bert"}  # derived from [[models]]: MiniLM's top layer
    assert "## Train: heads on cached features" in (out / "report.md").read_text()
