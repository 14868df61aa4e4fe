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

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize

RANK_SAFETY = 100.0
# float64 working set of the inner row blocks of a chunk (cache-sized, reused)
BLOCK_BYTES = 2 * 2**20
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


def variability(X, y, *, classes: Sequence | None = None, scheduler=None) -> VariabilityResult:
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
    return variability_by_layer(X[:, None, :], y, classes=classes, scheduler=scheduler)[0]


def variability_by_layer(X, y, *, classes: Sequence | None = None, scheduler=None) -> list[VariabilityResult]:
    """nu for every layer of an (n_rows, n_layers, d) array, in two passes.

    Each pass reads every chunk of X once for all layers. Memory stays at
    one (row chunk, layer chunk, d) block plus O(n_layers * K * d); the
    feature axis is rechunked to one piece because a row's projection
    needs all of its features.
    """
    return variability_many({0: X}, y, classes=classes, scheduler=scheduler)[0]


def variability_many(
    arrays: Mapping[Hashable, object], y, *, classes: Sequence | None = None, scheduler=None
) -> dict[Hashable, list[VariabilityResult]]:
    """``variability_by_layer`` for several (n_rows, n_layers, d) arrays that
    share the labels ``y`` (e.g. one per pooling), in two ``dask.compute``
    calls in all: each chunk of every array is read once per pass.

    Returns name -> per-layer results, identical to separate
    ``variability_by_layer`` calls.
    """
    plan = VariabilityPlan(arrays, y, classes=classes)
    (sums,) = dask.compute(plan.first_pass(), scheduler=scheduler)
    (sq,) = dask.compute(plan.second_pass(sums), scheduler=scheduler)
    return plan.results(sq)


class VariabilityPlan:
    """The two passes of ``variability_many`` as lazy graphs, so a caller can
    fuse them with other work over the same chunks into one ``dask.compute``::

        plan = VariabilityPlan({"mean": X1, "first": X2}, y)
        sums, = dask.compute(plan.first_pass())
        sq, other = dask.compute(plan.second_pass(sums), other_lazy)
        results = plan.results(sq)       # name -> list[VariabilityResult]
    """

    def __init__(self, arrays: Mapping[Hashable, object], y, *, classes: Sequence | None = None):
        if not arrays:
            raise ValueError("variability needs at least one array")
        self.arrays: dict = {}
        for name, X in arrays.items():
            X = _as_dask(X)
            if X.ndim != 3:
                raise ValueError(f"X must be 3-D (n_rows, n_layers, d), got {X.shape}")
            if X.numblocks[2] > 1:
                X = X.rechunk({2: -1})
            self.arrays[name] = X
        n_rows = {X.shape[0] for X in self.arrays.values()}
        if len(n_rows) != 1:
            raise ValueError(f"arrays disagree on the number of rows: {sorted(n_rows)}")
        self.n_rows = n_rows.pop()
        self.yidx, self.n_classes = _class_index(y, classes, self.n_rows)
        self.counts = np.bincount(self.yidx, minlength=self.n_classes).astype(np.float64)
        self._spectra: dict = {}

    def first_pass(self) -> dict:
        """name -> lazy (K+1, n_layers, d) float64: per-class sums, sum of squares."""
        return {
            name: chunk_sum(
                X,
                _moments_block,
                row_args=(self.yidx,),
                kwargs={"n_classes": self.n_classes},
                out_axes={1: 1, 2: 2},
                name="variability-moments",
            )
            for name, X in self.arrays.items()
        }

    def second_pass(self, sums: Mapping) -> dict:
        """name -> lazy (K, n_layers, K-1) per-class sums of squared projections."""
        out = {}
        for name, X in self.arrays.items():
            s = np.asarray(sums[name])
            mu = s[: self.n_classes] / self.counts[:, None, None]
            scale = np.sqrt(s[self.n_classes].sum(axis=-1) / self.n_rows)
            spectra = [_between_class_basis(mu[:, layer], scale[layer]) for layer in range(X.shape[1])]
            self._spectra[name] = spectra
            basis = np.stack([b for b, _, _ in spectra])  # (n_layers, d, K-1)
            layer_edges = np.cumsum((0,) + X.chunks[1])

            def per_layer_block(idx, mu=mu, basis=basis, edges=layer_edges):
                lo, hi = edges[idx[0]], edges[idx[0] + 1]
                return mu[:, lo:hi], basis[lo:hi]

            out[name] = chunk_sum(
                X,
                _projection_block,
                row_args=(self.yidx,),
                block_args=per_layer_block,
                out_axes={1: 1},
                name="variability-projections",
                token=(mu, basis),
            )
        return out

    def results(self, sq: Mapping) -> dict[Hashable, list[VariabilityResult]]:
        """name -> per-layer results from the second pass's values."""
        return {
            name: [
                _result(np.asarray(sq[name])[:, layer], self.counts, inv_s2, rank, self.n_rows)
                for layer, (_, inv_s2, rank) in enumerate(self._spectra[name])
            ]
            for name in self.arrays
        }


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


def chunk_sum(
    X: da.Array,
    kernel,
    *,
    out_axes: Mapping[int, int],
    row_args: Sequence[np.ndarray] = (),
    block_args=None,
    kwargs: Mapping | None = None,
    name: str = "chunk-sum",
    token=None,
    split_every: int = 8,
):
    """Delayed sum over the row chunks of ``X`` of ``kernel(block, ...)``.

    ``kernel(block, *row_slices, *block_args(idx), **kwargs)`` gets one
    chunk of X, the matching rows of every ``row_args`` array and, if given,
    ``block_args(idx)`` for the chunk's index ``idx`` along X's other axes;
    it returns a (1, ...) array. Partial results are summed in a tree of
    ``split_every`` (bounded memory however many chunks), then the pieces of
    X's other block axes are concatenated: X axis ``a`` goes to result axis
    ``out_axes[a]`` (axes not listed must have one chunk). The result drops
    the leading 1.

    One task per chunk and a few per sum: far fewer graph layers than the
    equivalent ``blockwise(...).sum(axis=0)``, whose graph building and
    optimisation cost more than the arithmetic on stores of a few chunks.
    Works on the local schedulers and on dask.distributed alike.
    """
    kwargs = dict(kwargs or {})
    for axis in range(1, X.ndim):
        if axis not in out_axes and X.numblocks[axis] != 1:
            raise ValueError(f"axis {axis} of X must be one chunk, got {X.chunks[axis]}")
    prefix = f"{name}-{tokenize(X.name, kernel, row_args, kwargs, token)}"
    parts = X.to_delayed(optimize_graph=False)
    row_edges = np.cumsum((0,) + X.chunks[0])
    kern = dask.delayed(kernel, pure=True)
    pieces = {}
    for idx in np.ndindex(*X.numblocks[1:]):
        extra = ()
        if block_args is not None:
            extra = tuple(dask.delayed(a, name=f"{prefix}-arg{m}-{'-'.join(map(str, idx))}") for m, a in enumerate(block_args(idx)))
        partial = [
            kern(
                parts[(i,) + idx],
                *(a[row_edges[i] : row_edges[i + 1]] for a in row_args),
                *extra,
                dask_key_name=f"{prefix}-{i}-{'-'.join(map(str, idx))}",
                **kwargs,
            )
            for i in range(X.numblocks[0])
        ]
        level = 0
        while len(partial) > 1:
            partial = [
                dask.delayed(_add, pure=True)(
                    *partial[j : j + split_every], dask_key_name=f"{prefix}-sum{level}-{j}-{'-'.join(map(str, idx))}"
                )
                for j in range(0, len(partial), split_every)
            ]
            level += 1
        pieces[idx] = partial[0]
    return dask.delayed(_assemble, pure=True)(
        list(pieces.values()),
        list(pieces),
        [X.numblocks[a] for a in range(1, X.ndim)],
        [out_axes.get(a) for a in range(1, X.ndim)],
        dask_key_name=f"{prefix}-result",
    )


def _add(*parts: np.ndarray) -> np.ndarray:
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out


def _assemble(pieces: list, index: list, numblocks: list, out_axes: list) -> np.ndarray:
    """Concatenate per-block results (leading 1 dropped) into one array."""
    pieces = {tuple(i): p[0] for i, p in zip(index, pieces)}
    if len(pieces) == 1:
        return next(iter(pieces.values()))

    def build(prefix: tuple) -> np.ndarray:
        depth = len(prefix)
        if depth == len(numblocks):
            return pieces[prefix]
        parts = [build(prefix + (j,)) for j in range(numblocks[depth])]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts, axis=out_axes[depth])

    return build(())


def _moments_block(x: np.ndarray, yb: np.ndarray, n_classes: int) -> np.ndarray:
    """Slots 0..K-1: per-class sums; slot K: sum of squares over all rows.

    Rows go through reused buffers of about ``BLOCK_BYTES`` (float64), all
    layers at once: gathered in class order, upcast exactly once, then each
    class is a contiguous run of rows summed with one reduction. No BLAS
    call: a threaded gemm with K rows is slower than the reduction, and
    oversubscribes the cores next to Dask's own threads.
    """
    out = np.zeros((1, n_classes + 1) + x.shape[1:])
    acc = out.reshape(n_classes + 1, -1)
    for b, runs in _class_sorted_blocks(x, yb, n_classes):
        for k, lo, hi in runs:
            acc[k] += b[lo:hi].sum(axis=0)
        acc[n_classes] += np.einsum("nf,nf->f", b, b)
    return out


def _class_sorted_blocks(x: np.ndarray, yb: np.ndarray, n_classes: int):
    """Yield (float64 block of rows sorted by class, [(k, lo, hi), ...]).

    The block buffers are allocated once per chunk and reused, so the only
    temporaries are a few cache-sized blocks whatever ``rows_per_chunk``.
    """
    n = x.shape[0]
    flat = x.reshape(n, -1)
    step = _block_rows(n, flat.shape[1])
    buf = np.empty((step, flat.shape[1]))
    raw = np.empty((step, flat.shape[1]), dtype=flat.dtype)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        yk = yb[lo:hi]
        order = np.argsort(yk, kind="stable")
        np.take(flat, order + lo, axis=0, out=raw[: hi - lo])
        b = buf[: hi - lo]
        np.copyto(b, raw[: hi - lo])
        ends = np.cumsum(np.bincount(yk, minlength=n_classes))
        runs = [(k, int(e - c), int(e)) for k, (c, e) in enumerate(zip(np.bincount(yk, minlength=n_classes), ends)) if c]
        yield b, runs


def _block_rows(n_rows: int, row_elems: int) -> int:
    """Rows per inner block so that one float64 block is about BLOCK_BYTES."""
    return max(1, min(n_rows, BLOCK_BYTES // (8 * max(row_elems, 1))))


def _projection_block(x: np.ndarray, yb: np.ndarray, mu: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Centre rows on their class mean first, then project (no cancellation).

    Same blocks as ``_moments_block``: rows in class order, so centring is
    an in-place subtraction of one mean per run of rows; one batched matmul
    projects every layer; squares are summed per run.
    """
    n, n_layers, d = x.shape
    n_classes = mu.shape[0]
    out = np.zeros((1, n_classes, n_layers, basis.shape[2]))
    mu_flat = mu.reshape(n_classes, n_layers * d)
    for b, runs in _class_sorted_blocks(x, yb, n_classes):
        for k, lo, hi in runs:
            b[lo:hi] -= mu_flat[k]
        z = np.matmul(b.reshape(-1, n_layers, d).transpose(1, 0, 2), basis)
        z *= z  # (L, rows, r)
        for k, lo, hi in runs:
            out[0, k] += z[:, lo:hi].sum(axis=1)
    return out


def _helmert(n_classes: int) -> np.ndarray:
    """(K-1, K) orthonormal rows orthogonal to ones: H^T H = I - 11^T/K."""
    h = np.zeros((n_classes - 1, n_classes))
    for j in range(1, n_classes):
        h[j - 1, :j] = 1.0
        h[j - 1, j] = -float(j)
        h[j - 1] /= np.sqrt(j * (j + 1.0))
    return h


def _between_class_basis(mu_layer: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, int]:
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


def _result(sq: np.ndarray, counts: np.ndarray, inv_s2: np.ndarray, rank: int, n_rows: int) -> VariabilityResult:
    """nu = sum_j w_j / s_j^2 with w_j = (1/K) sum_k sq[k, j] / n_k."""
    n_classes = counts.size
    if rank == 0:
        nu = np.nan if np.isnan(inv_s2).any() else np.inf
    else:
        w = (sq / counts[:, None]).mean(axis=0)
        nu = float(np.dot(w, inv_s2))
    return VariabilityResult(nu=float(nu), n_rows=int(n_rows), n_classes=int(n_classes), rank=int(rank))
