"""Per-layer probes: the separable layer wins, C selection, lazy loading, spearman."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from stages.train.probes import (
    evaluate,
    fit_probe,
    probe_layers,
    spearman_nu_accuracy,
)

N_TRAIN, N_DEV, N_TEST, D, GOOD = 300, 200, 300, 10, 3


def _labels(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, size=n)


@pytest.fixture(scope="module")
def layered():
    """Six layers of 3-class features; only layer GOOD separates the classes linearly."""
    ys = [_labels(s, n) for s, n in ((1, N_TRAIN), (2, N_DEV), (3, N_TEST))]
    means = np.random.default_rng(9).normal(size=(3, D)) * 4.0
    feats = {}
    for layer in range(6):
        splits = []
        for i, y in enumerate(ys):
            X = np.random.default_rng(100 * layer + i).normal(size=(y.size, D))
            if layer == GOOD:
                X = X + means[y]
            splits.append(X)
        feats[layer] = tuple(splits)
    return feats, ys


def test_probe_layers_finds_the_separable_layer(layered):
    feats, (ytr, ydv, yte) = layered
    df = probe_layers(feats, ytr, ydv, yte)
    assert list(df.columns) == [
        "layer", "C", "dev_accuracy", "dev_macro_f1",
        "test_accuracy", "test_macro_f1", "n_params", "fit_seconds",
    ]
    assert df["layer"].tolist() == list(range(6))
    best = df.loc[df["dev_accuracy"].idxmax()]
    assert best["layer"] == GOOD
    assert best["test_accuracy"] > 0.97
    others = df[df["layer"] != GOOD]
    assert (others["test_accuracy"] < 0.5).all()  # chance is 1/3
    assert (df["n_params"] == 3 * D + 3).all()
    assert (df["fit_seconds"] > 0).all()


def test_probe_layers_loads_lazily_one_layer_at_a_time(layered):
    feats, (ytr, ydv, yte) = layered
    calls, seen = [], []

    def load(layer):
        calls.append(layer)
        return feats[layer]

    df = probe_layers(load, ytr, ydv, yte, layers=[GOOD, 0], on_result=lambda l, r: seen.append((l, r.C)))
    assert calls == [GOOD, 0]
    assert df["layer"].tolist() == [GOOD, 0]
    assert [layer for layer, _ in seen] == [GOOD, 0]

    lazy = {layer: (lambda layer=layer: load(layer)) for layer in (1, 2)}
    calls.clear()
    probe_layers(lazy, ytr, ydv, yte)
    assert calls == [1, 2]


def test_probe_layers_needs_layers_for_a_callable(layered):
    feats, (ytr, ydv, yte) = layered
    with pytest.raises(ValueError, match="layers must be given when features is a callable loader"):
        probe_layers(feats.__getitem__, ytr, ydv, yte)
    with pytest.raises(ValueError, match=re.escape("layers [7] are not in features")):
        probe_layers(feats, ytr, ydv, yte, layers=[7])


def test_fit_probe_ties_go_to_the_smaller_C():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4))
    y = (X[:, 0] > 0).astype(int)
    X[:, 0] += np.where(y == 1, 5.0, -5.0)  # every C separates dev perfectly
    res = fit_probe(X[:100], y[:100], X[100:], y[100:], Cs=(10.0, 1.0, 0.1))
    assert res.C == 0.1
    assert res.dev_accuracy == 1.0
    assert res.n_params == 4 + 1  # binary: one weight vector and one intercept
    assert evaluate(res.model, X[100:], y[100:]) == {"accuracy": 1.0, "macro_f1": 1.0}


@pytest.mark.parametrize("Cs", [(), (0.0,), (-1.0, 1.0), (float("inf"),)])
def test_fit_probe_rejects_bad_Cs(Cs):
    X, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="Cs must be a non-empty sequence of finite positive floats"):
        fit_probe(X, y, X, y, Cs=Cs)


def test_spearman_ranks_infinite_nu_as_largest():
    inf = float("inf")
    assert spearman_nu_accuracy([1.0, 2.0, inf], [0.9, 0.8, 0.5]) == pytest.approx(-1.0)
    assert spearman_nu_accuracy([inf, 1.0, 2.0], [0.5, 0.9, 0.8]) == pytest.approx(-1.0)
    assert spearman_nu_accuracy([1.0, 2.0, 3.0, inf], [0.6, 0.7, 0.8, 0.9]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "nu, acc",
    [
        ([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]),
        ([1.0, 2.0, 3.0], [0.5, 0.5, 0.5]),
        ([float("inf")] * 3, [0.1, 0.2, 0.3]),
        ([1.0], [0.5]),
        ([], []),
        ([1.0, float("nan"), 3.0], [0.1, 0.2, 0.1]),
    ],
)
def test_spearman_is_nan_when_undefined(nu, acc, recwarn):
    assert math.isnan(spearman_nu_accuracy(nu, acc))
    assert not recwarn.list


def test_spearman_drops_nan_pairs_and_checks_lengths():
    assert spearman_nu_accuracy([1.0, float("nan"), 2.0, 3.0], [0.9, 0.1, 0.8, 0.7]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="nu and acc must be 1-D of equal length"):
        spearman_nu_accuracy([1.0, 2.0], [0.5])
