"""Hidden-state variability ``nu`` per layer, computed out of core.

Definition (Xie et al., 2022), for K classes with n_k rows each::

    mu_k    = mean of class k
    Sigma_W = (1/K) sum_k (1/n_k) sum_{i in k} (x_i - mu_k)(x_i - mu_k)^T
    Sigma_B = (1/K) sum_k (mu_k - mu_bar)(mu_k - mu_bar)^T,
              mu_bar = (1/K) sum_k mu_k          (unweighted mean of means)
    nu      = (1/K) trace(Sigma_W pinv(Sigma_B))

Class covariances are normalised by n_k (maximum-likelihood, not n_k - 1)
and every class weighs the same in Sigma_W whatever its size.

How it is computed without a d x d matrix: Sigma_B = M^T M / K with
M = H mu, where H is the (K-1, K) Helmert basis orthogonal to the all-ones
vector (H^T H is the centring matrix), so rank(Sigma_B) <= K-1 holds by
construction. With the SVD M = S diag(s) V^T, the range of Sigma_B is
spanned by the rows v_j of V^T with eigenvalues s_j^2 / K, hence::

    nu = sum_j  w_j / s_j^2,   w_j = v_j^T Sigma_W v_j
       = (1/K) sum_k (1/n_k) sum_{i in k} ((x_i - mu_k) . v_j)^2

Two passes over row chunks, each reading every chunk once for all layers:
pass 1 gives per-class counts and sums (and the total sum of squares, for
the scale of the data); pass 2 gives per-class sums of squared projections
of the centred rows onto the v_j. Accumulators are O(n_layers * K * d).

Rank rule: keep s_j > RANK_SAFETY * max(K, d) * eps64 * max(s_max, R),
with R the root-mean-square row norm of the layer. This is numpy's
``matrix_rank`` tolerance on the singular values of M (singular values,
not eigenvalues, because rounding in the means perturbs M, not M^T M),
times a safety factor of 100, and measured against the data scale R as
well as s_max so that means that coincide up to rounding (identical [CLS]
vectors, say) give rank 0. Rank 0 means nu = +inf, never 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import dask
import dask.array as da
import numpy as np

RANK_SAFETY = 100.0
_EPS = np.finfo(np.float64).eps


@dataclass(frozen=True)
class VariabilityResult:
    """nu of one feature block, with the sizes it was computed from.

    ``rank`` is the number of between-class directions kept (<= K-1);
    rank 0 means the class means coincide numerically and nu is +inf.
    """

    nu: float
    n_rows: int
    n_classes: int
    rank: int


def variability(X, y, *, classes: Sequence | None = None,
                scheduler=None) -> VariabilityResult:
    """nu of one (n_rows, d) feature matrix (one layer, one pooling).

    Parameters
    ----------
    X : dask.array.Array or numpy.ndarray, shape (n_rows, d)
        Any float dtype; accumulation is in float64.
    y : numpy.ndarray, shape (n_rows,)
        Class labels.
    classes : sequence, optional
        The label values, in order; defaults to the sorted unique labels.
        Every listed class must have rows and every label must be listed.
    scheduler : optional
        Forwarded to ``dask.compute`` (e.g. "threads" or a Client).
    """
    X = _as_dask(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_rows, d), got shape {X.shape}")
    return variability_by_layer(X[:, None, :], y, classes=classes,
                                scheduler=scheduler)[0]


def variability_by_layer(X, y, *, classes: Sequence | None = None,
                         scheduler=None) -> list[VariabilityResult]:
    """nu for every layer of an (n_rows, n_layers, d) array, in two passes.

    Each pass reads every chunk of X once for all layers. Memory stays at
    one (row chunk, layer chunk, d) block plus O(n_layers * K * d); the
    feature axis is rechunked to one piece because a row's projection
    needs all of its features.
    """
    X = _as_dask(X)
    if X.ndim != 3:
        raise ValueError(f"X must be 3-D (n_rows, n_layers, d), got {X.shape}")
    yidx, n_classes = _class_index(y, classes, X.shape[0])
    counts = np.bincount(yidx, minlength=n_classes).astype(np.float64)
    if X.numblocks[2] > 1:
        X = X.rechunk({2: -1})
    ylab = da.from_array(yidx, chunks=(X.chunks[0],))

    sums, = dask.compute(_first_pass(X, ylab, n_classes).sum(axis=0),
                         scheduler=scheduler)
    mu = sums[:n_classes] / counts[:, None, None]
    scale = np.sqrt(sums[n_classes].sum(axis=-1) / X.shape[0])
    spectra = [_between_class_basis(mu[:, layer], scale[layer])
               for layer in range(X.shape[1])]
    basis = np.stack([b for b, _, _ in spectra])  # (n_layers, d, K-1)

    sq, = dask.compute(_second_pass(X, ylab, mu, basis).sum(axis=0),
                       scheduler=scheduler)
    return [
        _result(sq[:, layer], counts, inv_s2, rank, X.shape[0])
        for layer, (_, inv_s2, rank) in enumerate(spectra)
    ]


def lowest_nu_layer(results: Sequence[VariabilityResult]) -> int:
    """Index of the layer with the smallest finite nu (first on ties).

    Raises ValueError when no layer has a finite nu: then no layer
    separates the classes and there is nothing sensible to select.
    """
    nus = np.array([r.nu for r in results], dtype=np.float64)
    if nus.size == 0 or not np.isfinite(nus).any():
        raise ValueError("no layer has a finite variability nu")
    return int(np.argmin(np.where(np.isfinite(nus), nus, np.inf)))


def _as_dask(X) -> da.Array:
    """Wrap numpy input so both kinds take the same path."""
    if isinstance(X, da.Array):
        return X
    X = np.asarray(X)
    chunks = ("auto",) + (-1,) * (X.ndim - 1)
    return da.from_array(X, chunks=chunks)


def _class_index(y, classes, n_rows: int) -> tuple[np.ndarray, int]:
    """Map labels to 0..K-1 and check every class is present."""
    y = np.asarray(y)
    if y.shape != (n_rows,):
        raise ValueError(f"y must have shape ({n_rows},), got {y.shape}")
    classes = np.unique(y) if classes is None else np.asarray(classes)
    if len(np.unique(classes)) != len(classes):
        raise ValueError("classes must be distinct")
    if len(classes) < 2:
        raise ValueError("variability needs at least two classes")
    order = np.argsort(classes, kind="stable")
    pos = np.searchsorted(classes[order], y)
    pos = np.clip(pos, 0, len(classes) - 1)
    if not np.all(classes[order][pos] == y):
        raise ValueError("y holds labels that are not in classes")
    yidx = order[pos].astype(np.int64)
    if np.bincount(yidx, minlength=len(classes)).min() == 0:
        raise ValueError("every class needs at least one row")
    return yidx, len(classes)


def _first_pass(X: da.Array, ylab: da.Array, n_classes: int) -> da.Array:
    """Per row chunk: per-class sums and the sum of squares, (1, K+1, L, d)."""
    return da.blockwise(
        _moments_block, "nkld", X, "nld", ylab, "n",
        n_classes=n_classes, new_axes={"k": n_classes + 1},
        adjust_chunks={"n": 1}, dtype=np.float64,
        meta=np.empty((0, 0, 0, 0), dtype=np.float64),
    )


def _moments_block(x: np.ndarray, yb: np.ndarray, n_classes: int) -> np.ndarray:
    """Slots 0..K-1: per-class sums; slot K: sum of squares over all rows.

    One layer at a time in float64, so the temporary is a (rows, d) slice.
    """
    onehot = _onehot(yb, n_classes)
    out = np.empty((1, n_classes + 1) + x.shape[1:])
    for layer in range(x.shape[1]):
        xl = x[:, layer, :].astype(np.float64)
        out[0, :n_classes, layer] = onehot @ xl
        out[0, n_classes, layer] = np.einsum("nd,nd->d", xl, xl)
    return out


def _onehot(yb: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, rows) indicator matrix: per-class sums become one matmul."""
    return (yb[None, :] == np.arange(n_classes)[:, None]).astype(np.float64)


def _second_pass(X: da.Array, ylab: da.Array, mu: np.ndarray,
                 basis: np.ndarray) -> da.Array:
    """Per row chunk: per-class sums of squared projections, (1, K, L, r)."""
    mu_d = da.from_array(mu, chunks=(mu.shape[0], X.chunks[1], X.chunks[2]))
    basis_d = da.from_array(basis, chunks=(X.chunks[1], X.chunks[2],
                                           basis.shape[2]))
    return da.blockwise(
        _projection_block, "nklr", X, "nld", ylab, "n", mu_d, "kld",
        basis_d, "ldr", adjust_chunks={"n": 1}, concatenate=True,
        dtype=np.float64,
        meta=np.empty((0, 0, 0, 0), dtype=np.float64),
    )


def _projection_block(x: np.ndarray, yb: np.ndarray, mu: np.ndarray,
                      basis: np.ndarray) -> np.ndarray:
    """Centre rows on their class mean first, then project (no cancellation)."""
    n_classes = mu.shape[0]
    onehot = _onehot(yb, n_classes)
    out = np.empty((1, n_classes, x.shape[1], basis.shape[2]))
    for layer in range(x.shape[1]):
        centred = x[:, layer, :].astype(np.float64)
        centred -= mu[yb, layer, :]
        z = centred @ basis[layer]
        out[0, :, layer, :] = onehot @ (z * z)
    return out


def _helmert(n_classes: int) -> np.ndarray:
    """(K-1, K) orthonormal rows orthogonal to ones: H^T H = I - 11^T/K."""
    h = np.zeros((n_classes - 1, n_classes))
    for j in range(1, n_classes):
        h[j - 1, :j] = 1.0
        h[j - 1, j] = -float(j)
        h[j - 1] /= np.sqrt(j * (j + 1.0))
    return h


def _between_class_basis(mu_layer: np.ndarray,
                         scale: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Kept range of Sigma_B: basis (d, K-1), 1/s_j^2 (0 where dropped), rank.

    Columns beyond the rank are zero, so every layer has the same shape.
    """
    n_classes, d = mu_layer.shape
    basis = np.zeros((d, n_classes - 1))
    inv_s2 = np.zeros(n_classes - 1)
    if not (np.all(np.isfinite(mu_layer)) and np.isfinite(scale)):
        return basis, np.full(n_classes - 1, np.nan), 0
    m = _helmert(n_classes) @ mu_layer
    _, s, vt = np.linalg.svd(m, full_matrices=False)
    tol = RANK_SAFETY * max(n_classes, d) * _EPS * max(s[0], scale)
    keep = np.flatnonzero(s > tol)
    basis[:, keep] = vt[keep].T
    inv_s2[keep] = 1.0 / s[keep] ** 2
    return basis, inv_s2, int(keep.size)


def _result(sq: np.ndarray, counts: np.ndarray, inv_s2: np.ndarray,
            rank: int, n_rows: int) -> VariabilityResult:
    """nu = sum_j w_j / s_j^2 with w_j = (1/K) sum_k sq[k, j] / n_k."""
    n_classes = counts.size
    if rank == 0:
        nu = np.nan if np.isnan(inv_s2).any() else np.inf
    else:
        w = (sq / counts[:, None]).mean(axis=0)
        nu = float(np.dot(w, inv_s2))
    return VariabilityResult(nu=float(nu), n_rows=int(n_rows),
                             n_classes=int(n_classes), rank=int(rank))
