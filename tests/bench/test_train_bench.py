"""The train floor counts a head's arithmetic exactly: an MLP head's FLOPs by hand against torch's counter."""

from __future__ import annotations

import numpy as np
import pytest

from bench.train_bench import compute_floor
from stages.entries import heads_format
from stages.train.fusion import FusionHead


def test_floor_of_an_mlp_head_matches_its_flops_by_hand():
    rng = np.random.default_rng(0)
    dims = {"a": 6, "b": 4}
    n, m, hidden = 40, 12, 8
    X = {k: rng.normal(size=(n, d)) for k, d in dims.items()}
    y = rng.integers(0, 3, n)
    head = FusionHead(hidden=hidden, epochs=3, patience=10, cooccurrence=False, projection=False).fit(X, y, X, y)
    blobs = heads_format.entry_files("concat_mlp", head.to_bytes())
    got = compute_floor("concat_mlp", blobs, n, m, peak_gflops=2.0)
    d, k = sum(dims.values()), len(head.classes_)
    # train: forward 2n(dh + hk); backward: the input gradient of the second layer 2nhk and both weight
    # gradients 2n(dh + hk) (the features need none); dev: forward only
    want = 2 * n * (d * hidden + hidden * k) + 2 * n * hidden * k + 2 * n * (d * hidden + hidden * k) + 2 * m * (d * hidden + hidden * k)
    assert got["epoch_flop"] == want
    assert got["epochs_run"] == len(head.history_) == 3
    assert got["seconds_at_matmul_peak"] == pytest.approx(3 * want / 1e9 / 2.0, rel=1e-5)


def test_no_floor_for_a_head_without_epochs():
    blobs = heads_format.entry_files("concat", heads_format.pack({"w": np.zeros(2)}, {"format": "concat-head"}))
    assert compute_floor("concat", blobs, 10, 5, peak_gflops=1.0) == {}
