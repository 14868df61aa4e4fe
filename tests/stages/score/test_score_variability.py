"""Variability nu against plain full-matrix numpy references."""

import threading

import dask.array as da
import numpy as np
import pytest

from stages.score.variability import (
    VariabilityResult,
    lowest_nu_layer,
    variability,
    variability_by_layer,
)


def reference_nu(X, y):
    """Full d x d Sigma_W and Sigma_B; pinv restricted to Sigma_B's top K-1
    eigen-directions (its exact range for generic data)."""
    X = np.asarray(X, dtype=np.float64)
    classes = np.unique(y)
    n_classes, d = len(classes), X.shape[1]
    means = np.array([X[y == c].mean(axis=0) for c in classes])
    sigma_w = np.zeros((d, d))
    for c in classes:
        rows = X[y == c]
        centred = rows - rows.mean(axis=0)
        sigma_w += centred.T @ centred / len(rows)  # == np.cov(bias=True)
    sigma_w /= n_classes
    centred_means = means - means.mean(axis=0)
    sigma_b = np.zeros((d, d))
    for m in centred_means:
        sigma_b += np.outer(m, m)
    sigma_b /= n_classes
    evals, evecs = np.linalg.eigh(sigma_b)
    r = min(n_classes - 1, d)
    lam, vec = evals[-r:], evecs[:, -r:]
    assert lam.min() > 1e-8 * lam.max()  # the reference's own sanity check
    pinv_b = vec @ np.diag(1.0 / lam) @ vec.T
    return np.trace(sigma_w @ pinv_b) / n_classes


def make_data(sizes, d, seed, spread=1.0, dtype=np.float64):
    """Gaussian classes with distinct means; rows shuffled."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(sizes)), sizes)
    means = rng.normal(size=(len(sizes), d)) * spread
    X = rng.normal(size=(len(y), d)) * rng.uniform(0.5, 2.0, size=d) + means[y]
    order = rng.permutation(len(y))
    return X[order].astype(dtype), y[order]


def test_known_answer_1d_two_classes():
    # A = {0, 2}: mean 1, var 1; B = {4, 6, 8}: mean 6, var 8/3.
    # Sigma_W = (1 + 8/3) / 2 = 11/6; Sigma_B = 2.5^2 = 6.25;
    # nu = (1/2) (11/6) / 6.25 = 11/75.
    X = np.array([[0.0], [2.0], [4.0], [6.0], [8.0]])
    y = np.array([0, 0, 1, 1, 1])
    res = variability(X, y)
    assert res == VariabilityResult(nu=pytest.approx(11 / 75, rel=1e-12), n_rows=5, n_classes=2, rank=1)


@pytest.mark.parametrize("sizes", [(40, 90), (10, 200, 35, 17, 60, 8)])
@pytest.mark.parametrize("d", [5, 300])
def test_matches_reference_float16_chunks(sizes, d):
    X, y = make_data(sizes, d, seed=d + len(sizes), dtype=np.float16)
    expected = reference_nu(X, y)
    Xd = da.from_array(X, chunks=(37, d))  # 37 divides no row count here
    res = variability(Xd, y)
    assert res.rank == min(len(sizes) - 1, d)
    assert res.n_rows == len(y) and res.n_classes == len(sizes)
    assert res.nu == pytest.approx(expected, rel=1e-6)


def test_imbalanced_d_larger_than_class_sizes():
    X, y = make_data((10, 200, 35), d=256, seed=3, spread=0.3)
    res = variability(da.from_array(X, chunks=(23, 64)), y)
    assert res.nu == pytest.approx(reference_nu(X, y), rel=1e-6)


def test_low_dimension_exact_pinv():
    # d = 3 < K - 1 = 5: Sigma_B is invertible, so plain pinv is exact.
    X, y = make_data((12, 7, 30, 9, 15, 21), d=3, seed=11)
    K = 6
    means = np.array([X[y == k].mean(0) for k in range(K)])
    sigma_w = sum(np.cov(X[y == k].T, bias=True) for k in range(K)) / K
    sigma_b = np.cov(means.T, bias=True)
    expected = np.trace(sigma_w @ np.linalg.pinv(sigma_b)) / K
    res = variability(X, y)
    assert res.rank == 3
    assert res.nu == pytest.approx(expected, rel=1e-9)


def test_by_layer_matches_per_layer_reference():
    rng = np.random.default_rng(5)
    n, L, d = 157, 4, 40
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, L, d)) + rng.normal(size=(3, L, d))[y] * np.array([0.0, 0.1, 1.0, 5.0])[None, :, None]
    X[:, 0, :] = rng.normal(size=d)  # layer 0: every row identical
    Xd = da.from_array(X.astype(np.float16), chunks=(30, 3, 17))
    results = variability_by_layer(Xd, y)
    assert results[0].nu == np.inf and results[0].rank == 0
    for layer in range(1, L):
        expected = reference_nu(X[:, layer].astype(np.float16), y)
        assert results[layer].nu == pytest.approx(expected, rel=1e-6)
    assert lowest_nu_layer(results) == 3


def test_coinciding_means_is_inf():
    # Same class means up to rounding (0.3 +- 1 does not round-trip), with
    # different spreads: nu must be +inf, never a rounding-noise number.
    rng = np.random.default_rng(2)
    c = rng.normal(size=5)
    X = np.stack([c - 1, c + 1, c - 2, c + 2, c - 0.5, c + 0.5])
    y = np.array([0, 0, 1, 1, 2, 2])
    res = variability(X, y)
    assert res.nu == np.inf and res.rank == 0


def test_identical_rows_float16_is_inf():
    row = np.random.default_rng(0).normal(size=64).astype(np.float16)
    X = da.from_array(np.tile(row, (100, 1)), chunks=(13, 64))
    res = variability(X, np.arange(100) % 4)
    assert res.nu == np.inf


@pytest.mark.parametrize("scale", [1e-3, 7.0, 1e4])
def test_invariant_to_scaling(scale):
    X, y = make_data((30, 50, 20), d=20, seed=1)
    assert variability(X * scale, y).nu == pytest.approx(variability(X, y).nu, rel=1e-10)


def test_invariant_to_offset():
    X, y = make_data((30, 50, 20), d=20, seed=1)
    offset = np.random.default_rng(9).normal(size=20) * 1e3
    assert variability(X + offset, y).nu == pytest.approx(variability(X, y).nu, rel=1e-8)


def test_separation_orders_nu():
    X_far, y = make_data((100, 100, 100), d=16, seed=4, spread=10.0)
    X_near, _ = make_data((100, 100, 100), d=16, seed=4, spread=0.1)
    assert variability(X_far, y).nu < 0.01 < variability(X_near, y).nu


def test_classes_argument_order_and_checks():
    X, y = make_data((20, 30, 25), d=6, seed=8)
    labels = np.array([3, -1, 10])[y]
    nu = variability(X, y).nu
    assert variability(X, labels, classes=[10, 3, -1]).nu == pytest.approx(nu)
    with pytest.raises(ValueError, match="not in classes"):
        variability(X, labels, classes=[10, 3])
    with pytest.raises(ValueError, match="at least one row"):
        variability(X, labels, classes=[10, 3, -1, 7])
    with pytest.raises(ValueError, match="two classes"):
        variability(X, np.zeros(len(y), dtype=int))


def test_threads_and_sync_schedulers_agree():
    X, y = make_data((50, 80), d=30, seed=6, dtype=np.float16)
    Xd = da.from_array(X, chunks=(19, 30))
    a = variability(Xd, y, scheduler="threads")
    b = variability(Xd, y, scheduler="synchronous")
    assert a.nu == pytest.approx(b.nu, rel=1e-12)


class _CountingArray:
    """Array-like that counts every read, to check passes over the data."""

    def __init__(self, data):
        self.data, self.reads = data, 0
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self._lock = threading.Lock()

    def __getitem__(self, key):
        with self._lock:
            self.reads += 1
        return self.data[key]


def test_each_chunk_read_once_per_pass_for_all_layers():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 100)
    source = _CountingArray(rng.normal(size=(100, 5, 8)).astype(np.float16))
    X = da.from_array(source, chunks=(25, 5, 8), asarray=True)
    source.reads = 0  # from_array reads an empty slice for its meta
    results = variability_by_layer(X, y)
    assert len(results) == 5
    assert source.reads == 2 * X.numblocks[0]


def test_lowest_nu_layer():
    mk = lambda nu: VariabilityResult(nu=nu, n_rows=1, n_classes=2, rank=1)
    assert lowest_nu_layer([mk(np.inf), mk(2.0), mk(0.5), mk(0.5)]) == 2
    with pytest.raises(ValueError):
        lowest_nu_layer([mk(np.inf), mk(np.nan)])
