"""A corpus without a dev file (TREC): data.dev_fraction carves one from train, and every stage reads the same cut."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from config_factory import KEYWORDS, ROOT

TREC_TOML = """\
name = "trec-tiny"
seed = 0

[data]
name = "trec"
path = "{data}"
splits = ["train", "test"]
limit = 90
dev_fraction = 0.2

[[models]]
name = "bert"
source = "tiny-random-bert"

[extract]
max_length = 32
shard_rows = 64

[score]
keywords = "{keywords}"
min_fires = 2

[train]
Cs = [1.0]
poolings = ["mean"]
"""


@pytest.mark.slow  # extract, score and train of one tiny model, about 10 s on 2 cores
def test_carved_dev_split_through_extract_score_and_train(tmp_path):
    from pipeline import orchestrate
    from pipeline.config import load_config
    from pipeline.data import load_splits

    cfg_path = tmp_path / "trec.toml"
    cfg_path.write_text(TREC_TOML.format(data=ROOT / "data" / "trec", keywords=KEYWORDS), encoding="utf-8")
    cfg = load_config(cfg_path)
    splits = load_splits(cfg.data, cfg.seed)
    assert {s: len(v) for s, v in splits.items()} == {"train": 90 - len(splits["dev"]), "test": 90, "dev": len(splits["dev"])}
    assert 0 < len(splits["dev"]) < 90
    store_dir, out = tmp_path / "store", tmp_path / "out"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert orchestrate.extract(cfg, str(store_dir), progress=False) == 0
        # score reads the carved train split (the rows extract stored), not the whole train file
        assert orchestrate.score(cfg, str(store_dir), out, progress=False) == 0
        assert orchestrate.train(cfg, str(store_dir), out, progress=False) == 0
    finally:
        torch.set_num_threads(previous)
    variability = pd.read_parquet(out / "variability.parquet")
    assert set(variability["n_rows"]) == {len(splits["train"])}
    train = pd.read_parquet(out / "train.parquet")
    assert set(train["split"]) == {"dev", "test"} and (train["head"] == "probe").any()
