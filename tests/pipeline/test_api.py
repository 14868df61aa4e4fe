"""The notebook API: `load_features` and `load_head`, and the README example run as written."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from pipeline_helpers import PROJECT_ROOT

N_LAYERS, WIDTH = 5, 6


def _features(store, split: str, n: int, seed: int, label_names=None, model="bert"):
    """A features entry laid out as extract writes it, with classes separable at layer 4 only."""
    from store import fingerprint

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    hidden = rng.standard_normal((n, N_LAYERS + 1, WIDTH)).astype(np.float16)
    hidden[:, 4, 0] += np.where(labels == 1, 4.0, -4.0).astype(np.float16)
    dataset = {"name": "sst2", "split": split, **({"label_names": label_names} if label_names else {})}
    desc = {
        "kind": "features",
        "dataset": dataset,
        "model": {"name": model},
        "name": f"sst2/{split}/{model}",
        "n_layers": N_LAYERS,
        "seed": seed,
    }
    w = store.writer(fingerprint(desc), desc, n_shards=2)
    half = n // 2
    for i, (lo, hi) in enumerate(((0, half), (half, n))):
        table = pd.DataFrame({"row": np.arange(lo, hi), "label": labels[lo:hi], "text": [f"t{j}" for j in range(lo, hi)]})
        w.write_shard(i, {"hidden/mean": hidden[lo:hi], "hidden/first": hidden[lo:hi]}, table, row_start=lo)
    return w.commit(), hidden, labels


def test_readme_example_runs(tmp_path):
    """The five-line scikit-learn example under README "Python API", run as written in a folder with a store."""
    from store import Store

    store = Store(tmp_path / "featurestore")
    _features(store, "train", 120, 0)
    _features(store, "dev", 60, 1)
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Python API\n.*?```python\n(.*?)```", readme, re.S)[1]
    assert len(code.strip().splitlines()) == 5
    env = {"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) > 0.95


def test_load_features_numpy_frame_lazy_and_names(tmp_path):
    from pipeline import load_features
    from store import Store

    store = Store(tmp_path / "fs")
    entry, hidden, labels = _features(store, "train", 40, 0, label_names=["neg", "pos"])
    X, y = load_features(store, dataset="sst2", split="train", model="bert", layer=4)
    np.testing.assert_array_equal(X, hidden[:, 4, :].astype(np.float32))
    assert X.dtype == np.float32 and y.tolist() == [["neg", "pos"][i] for i in labels]
    top, _ = load_features(str(tmp_path / "fs"), model="bert", layer=-1, pooling="first")
    np.testing.assert_array_equal(top, hidden[:, N_LAYERS, :].astype(np.float32))
    frame, series = load_features(store, key=entry.key[:10], layer=4, as_frame=True)
    assert list(frame.columns) == [f"h{i}" for i in range(WIDTH)] and series.name == "label"
    np.testing.assert_array_equal(frame.to_numpy(), X)
    lazy, _ = load_features(store, model="bert", layer=4, lazy=True)
    assert type(lazy).__module__.startswith("dask") and lazy.numblocks[0] == 2
    np.testing.assert_array_equal(lazy.compute(), X)
    with pytest.raises(ValueError, match=r"layer=6: expected 0..5"):
        load_features(store, model="bert", layer=6)


def test_load_features_ambiguous_and_missing(tmp_path):
    from pipeline import load_features
    from pipeline.errors import PipelineError
    from store import Store

    store = Store(tmp_path / "fs")
    _features(store, "train", 10, 0)
    _features(store, "dev", 10, 1)
    with pytest.raises(PipelineError, match=r"2 feature entries match .*sst2/train/bert.*narrow"):
        load_features(store, model="bert")
    with pytest.raises(PipelineError, match=r"no features with model='roberta'"):
        load_features(store, model="roberta")


def test_key_and_names_must_agree_and_layer_must_be_an_int(tmp_path):
    from pipeline import load_features
    from pipeline.errors import PipelineError
    from store import Store

    store = Store(tmp_path / "fs")
    dev, hidden, _ = _features(store, "dev", 10, 1)
    X, _ = load_features(store, key=dev.key[:8], split="dev", model="bert", layer=2)
    np.testing.assert_array_equal(X, hidden[:, 2, :].astype(np.float32))
    with pytest.raises(PipelineError, match=rf"entry {dev.key[:12]} has model.name='bert', not 'llama'; drop the name or the key"):
        load_features(store, key=dev.key[:8], model="llama")
    with pytest.raises(PipelineError, match=r"has dataset.split='dev', not 'train'"):
        load_features(store, key=dev.key, split="train")
    for bad in ("4", True, 4.0):
        with pytest.raises(ValueError, match=r"layer=.*: expected an int"):
            load_features(store, key=dev.key, layer=bad)


def test_pooler_output_loads_as_its_one_layer(tmp_path):
    """What the LLMEmbed head reads as ``bert:pooler``; a model without a trained pooler says so."""
    from pipeline import load_features
    from pipeline.errors import PipelineError
    from store import Store, fingerprint

    store = Store(tmp_path / "fs")
    plain, _, _ = _features(store, "dev", 10, 1)
    desc = {"kind": "features", "dataset": {"name": "sst2", "split": "dev"}, "model": {"name": "pooled"}, "n_layers": N_LAYERS}
    pooler = np.random.default_rng(0).standard_normal((8, 1, WIDTH)).astype(np.float16)
    w = store.writer(fingerprint(desc), desc, n_shards=1)
    table = pd.DataFrame({"row": np.arange(8), "label": np.arange(8) % 2, "text": list("abcdefgh")})
    w.write_shard(0, {"hidden/mean": np.zeros((8, N_LAYERS + 1, WIDTH), np.float16), "hidden/pooler": pooler}, table, row_start=0)
    w.commit()
    for layer in (0, -1):
        X, y = load_features(store, model="pooled", pooling="pooler", layer=layer)
        np.testing.assert_array_equal(X, pooler[:, 0, :].astype(np.float32))
    with pytest.raises(ValueError, match=r"layer=1: expected 0..0 \(or -1..-1\) \(the pooler output is one layer\)"):
        load_features(store, model="pooled", pooling="pooler", layer=1)
    with pytest.raises(PipelineError, match=rf"entry {plain.key[:12]} has no pooler output"):
        load_features(store, model="bert", pooling="pooler", layer=0)
    with pytest.raises(ValueError, match=r"pooling='cls': expected one of \['mean', 'first', 'last', 'pooler'\]"):
        load_features(store, model="bert", pooling="cls")


def test_importing_the_config_does_not_import_the_stages():
    code = "import sys, pipeline.config; import pipeline; print(any(m.startswith(('stages', 'torch', 'dask')) for m in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip() == "False", proc.stderr
    import pipeline

    assert callable(pipeline.load_features) and callable(pipeline.load_head)
    with pytest.raises(AttributeError):
        pipeline.no_such_thing  # noqa: B018
