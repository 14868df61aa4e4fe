"""String labels end to end: extract, score, train, predict, the API and the report speak class names."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tiny_pipeline as tp
import torch
from config_factory import write_config


@pytest.mark.slow  # a full tiny run, about 20 s on 2 cores
def test_string_labels_through_the_pipeline(tmp_path, capsys):
    from pipeline import load_features, load_head, orchestrate
    from pipeline.cli import main
    from store import Store

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "dev", "test"):
        df = pd.read_csv(tp.DATA / f"{split}.tsv", sep="\t", dtype=str, quoting=3, keep_default_na=False).head(40)
        df["label"] = df["label"].map({"0": "negative", "1": "positive"})
        df.to_csv(data / f"{split}.tsv", sep="\t", index=False, quoting=3)
    cfg_path = write_config(tmp_path / "strings.toml", tp.tiny_experiment(rows=40, data=data))
    cfg = tp.load(cfg_path)
    store_dir, out = tmp_path / "store", tmp_path / "out"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in (
            lambda: orchestrate.extract(cfg, str(store_dir), progress=False),
            lambda: orchestrate.score(cfg, str(store_dir), out, progress=False),
            lambda: orchestrate.train(cfg, str(store_dir), out, progress=False),
        ):
            assert step() == 0
    finally:
        torch.set_num_threads(previous)
    assert "Classes: 0 = negative, 1 = positive" in (out / "report.md").read_text()
    X, y = load_features(str(store_dir), dataset="sst2", split="dev", model="t5", layer=1)
    assert set(y) == {"negative", "positive"} and len(y) == 40
    head = load_head(Store(str(store_dir)), "probe:t5:1:mean")
    assert list(head.classes_) == ["negative", "positive"]
    assert set(head.predict(X)) <= {"negative", "positive"}
    np.testing.assert_allclose(head.predict_proba(X).sum(axis=1), 1.0, rtol=1e-6)
    capsys.readouterr()
    assert main(["predict", "--config", str(cfg_path), "--store", str(store_dir), "--head", "probe:t5:1:mean", "-q", "a fine film"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "label\tp_negative\tp_positive\ttext" and lines[1].split("\t")[0] in ("negative", "positive")
