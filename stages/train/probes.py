"""Linear probes on cached per-layer features, and their safe persistence.

A probe is a standardised multinomial logistic regression whose inverse
regularisation ``C`` is chosen on the dev split. It is the yardstick the
train stage uses to ask "how linearly readable is the task at layer l?",
which is what the variability score ``nu`` claims to predict without
training anything; :func:`spearman_nu_accuracy` checks that claim.

Probes are fitted by a batched torch solver (:mod:`stages.train._logistic`) that fits
every layer of a model and every ``C`` in one pass over the features, on CPU or CUDA.
scikit-learn's lbfgs (``solver="sklearn"``) solves the same objective one fit at a time
and stays as the reference the tests compare against.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from pipeline.head_params import CS, DEFAULT_CS
from stages.entries import heads_format

__all__ = [
    "DEFAULT_CS",
    "ProbeResult",
    "fit_probe",
    "fit_probes",
    "evaluate",
    "probe_layers",
    "spearman_nu_accuracy",
    "probe_to_arrays",
    "probe_from_arrays",
    "probe_to_bytes",
    "probe_from_bytes",
]

logger = logging.getLogger(__name__)

SOLVERS = ("torch", "sklearn")
DEFAULT_BATCH_BYTES = 1 << 30
"""Cap on the float32 train features :func:`probe_layers` stacks into one batched fit."""
PROBE_FORMAT = "linear-probe"
PROBE_FORMAT_VERSION = 1

LayerSplits = tuple[np.ndarray, np.ndarray, np.ndarray]
"""``(X_train, X_dev, X_test)`` for one layer."""


@dataclass(frozen=True)
class ProbeResult:
    """A dev-selected probe and what it cost.

    Attributes
    ----------
    model : sklearn.pipeline.Pipeline
        ``StandardScaler`` then ``LogisticRegression``, fitted on train with the chosen ``C``.
    C : float
        The inverse regularisation strength with the best dev accuracy (ties go to the smaller).
    dev_accuracy : float
        Dev accuracy of ``model``.
    fit_seconds : float
        Wall time of the whole ``C`` sweep, since that is what choosing the probe cost
        (for a batched fit, this probe's equal share of the batch's time).
    n_params : int
        Learned weights of the classifier: ``coef_.size + intercept_.size``.
    """

    model: Pipeline
    C: float
    dev_accuracy: float
    fit_seconds: float
    n_params: int


def _make_probe(C: float, seed: int, max_iter: int, tol: float = 1e-4) -> Pipeline:
    # lbfgs on >2 classes fits the multinomial (softmax) loss; on 2 classes the
    # binary logistic loss, which is the same model with one weight vector.
    return Pipeline(
        [
            ("scaler", StandardScaler()),
            ("logreg", LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=tol, random_state=seed)),
        ]
    )


def _check_Cs(Cs: Sequence[float]) -> list[float]:
    """The distinct ``Cs``, ascending; checked against the constraint ``train.Cs`` has at config load."""
    Cs = tuple(Cs) if hasattr(Cs, "__iter__") and not isinstance(Cs, (str, bytes)) else Cs
    if not CS.check(Cs):
        raise ValueError(f"Cs must be {CS.allowed}, got {Cs!r}")
    return sorted({float(c) for c in Cs})


def fit_probe(
    X_train,
    y_train,
    X_dev,
    y_dev,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    max_iter: int = 1000,
    solver: str = "torch",
    device=None,
    tol: float = 1e-4,
) -> ProbeResult:
    """Fit one probe per ``C`` on train and keep the one with the best dev accuracy.

    No refit on train+dev: the dev split stays an honest selection set and the
    returned model is exactly the one that was scored.

    Parameters
    ----------
    X_train, X_dev : array-like of shape (n_samples, n_features)
    y_train, y_dev : array-like of shape (n_samples,)
    Cs : sequence of float
        Candidate inverse regularisation strengths; ties in dev accuracy go to the smaller ``C``.
    seed : int
        Passed as ``random_state`` (lbfgs itself is deterministic).
    max_iter : int
        Iteration cap; hitting it is logged as a warning, not raised.
    solver : {"torch", "sklearn"}
        ``"torch"``: the batched solver (:func:`fit_probes` with one feature set);
        ``"sklearn"``: scikit-learn's lbfgs, warm-started along ``Cs``, the reference.
    device : str or torch.device, optional
        Where the torch solver runs (default CPU).
    tol : float
        Stop once ``max |gradient| <= tol`` (scikit-learn's ``tol``).

    Returns
    -------
    ProbeResult

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 5)); y = (X[:, 0] > 0).astype(int)
    >>> res = fit_probe(X[:100], y[:100], X[100:], y[100:])
    >>> res.dev_accuracy > 0.9
    True
    """
    Cs = _check_Cs(Cs)
    _check_solver(solver, max_iter)
    if solver == "torch":
        return fit_probes([X_train], y_train, [X_dev], y_dev, Cs=Cs, seed=seed, max_iter=max_iter, tol=tol, device=device)[0]
    best: tuple[float, float, Pipeline] | None = None
    t0 = time.perf_counter()
    # Standardise once and sweep C upwards from the previous solution (warm start): weaker
    # regularisation starts near its optimum, so the sweep costs little more than one fit.
    scaler = StandardScaler().fit(X_train)
    Z_train, Z_dev = scaler.transform(X_train), scaler.transform(X_dev)
    logreg = _make_probe(Cs[0], seed, max_iter, tol)[-1].set_params(warm_start=True)
    for C in Cs:
        logreg.set_params(C=C)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            logreg.fit(Z_train, y_train)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            logger.warning("probe with C=%g did not converge in max_iter=%d", C, max_iter)
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        acc = accuracy_score(y_dev, logreg.predict(Z_dev))
        logger.debug("probe C=%g dev accuracy %.4f", C, acc)
        if best is None or acc > best[1]:
            fitted = copy.deepcopy(logreg).set_params(warm_start=False)
            best = (C, acc, Pipeline([("scaler", scaler), ("logreg", fitted)]))
    fit_seconds = time.perf_counter() - t0
    C, acc, model = best
    lr = model[-1]
    return ProbeResult(
        model=model,
        C=C,
        dev_accuracy=float(acc),
        fit_seconds=fit_seconds,
        n_params=int(lr.coef_.size + lr.intercept_.size),
    )


def _check_solver(solver: str, max_iter: int) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")


def fit_probes(
    Xs_train: Sequence,
    y_train,
    Xs_dev: Sequence,
    y_dev,
    *,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-4,
    device=None,
    dtype: str = "float32",
) -> list[ProbeResult]:
    """Fit the ``C`` sweep of several same-shaped feature sets at once (all layers of a model).

    Each feature set is standardised on its train rows, then every (feature set, ``C``)
    logistic regression is solved together by :func:`stages.train._logistic.fit_batched`
    (scikit-learn's objective and stopping rule, ``max |gradient| <= tol``). The ``C`` with
    the best dev accuracy wins, ties to the smaller, exactly as in :func:`fit_probe`; dev
    accuracy is scored by the returned scikit-learn pipeline itself.

    Parameters
    ----------
    Xs_train, Xs_dev : sequence of array-like of shape (n_samples, n_features)
        One train and one dev matrix per feature set; all train matrices share a shape.
    y_train, y_dev, Cs, seed, max_iter
        As in :func:`fit_probe`.
    tol : float
        Gradient tolerance, as scikit-learn's ``tol``.
    device : str or torch.device, optional
        Where to solve (default CPU); results come back as NumPy.
    dtype : {"float32", "float64"}
        Solver precision; float32 halves the memory traffic, float64 reaches tolerances below 1e-6.

    Returns
    -------
    list of ProbeResult
        One per feature set, in order.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 5)); y = (X[:, 0] > 0).astype(int)
    >>> [r.dev_accuracy > 0.9 for r in fit_probes([X[:100], X[:100, ::-1]], y[:100], [X[100:], X[100:, ::-1]], y[100:])]
    [True, True]
    """
    import torch

    if len(Xs_train) != len(Xs_dev) or not len(Xs_train):
        raise ValueError(f"need one dev matrix per train matrix, got {len(Xs_train)} and {len(Xs_dev)}")
    t0 = time.perf_counter()
    first = np.asarray(Xs_train[0])
    X = torch.empty((len(Xs_train), *first.shape), dtype=getattr(torch, dtype))
    for i, x in enumerate(Xs_train):
        x = np.asarray(x)
        if x.shape != first.shape:
            raise ValueError(f"all train matrices must share one shape, got {first.shape} and {x.shape}")
        X[i] = torch.from_numpy(np.asarray(x, dtype=dtype))
    return _fit_stacked(X, y_train, list(Xs_dev), y_dev, _check_Cs(Cs), seed, max_iter, tol, device, t0)


def _fit_stacked(X, y_train, Xs_dev, y_dev, Cs, seed, max_iter, tol, device, t0) -> list[ProbeResult]:
    """:func:`fit_probes` on float32 train features already stacked as ``(L, n, d)``."""
    import torch

    from stages.train._logistic import fit_batched, standardise

    y_train = np.asarray(y_train)
    if y_train.shape != (X.shape[1],):
        raise ValueError(f"y_train has shape {y_train.shape}, expected ({X.shape[1]},)")
    classes, y_idx = np.unique(y_train, return_inverse=True)
    if classes.size < 2:
        raise ValueError(f"a probe needs at least 2 classes in y_train, got only {classes.tolist()}")
    device = torch.device(device if device is not None else "cpu")
    Z, mean, var = standardise(X.to(device), overwrite=True)
    fit = fit_batched(Z, torch.from_numpy(y_idx).long(), int(classes.size), Cs, max_iter=max_iter, tol=tol, overwrite_Z=True)
    del Z
    coef, intercept = fit.coef.double().cpu().numpy(), fit.intercept.double().cpu().numpy()
    n_iter, converged = fit.n_iter.cpu().numpy(), fit.converged.cpu().numpy()
    mean, var = mean.double().cpu().numpy(), var.double().cpu().numpy()
    for layer, j in zip(*np.nonzero(~converged)):
        logger.warning("probe %d with C=%g did not converge in max_iter=%d", layer, Cs[j], max_iter)
    seconds = (time.perf_counter() - t0) / X.shape[0]
    results = []
    for i, X_dev in enumerate(Xs_dev):
        scaler = StandardScaler()
        scaler.mean_, scaler.var_ = mean[i], var[i]
        scaler.scale_ = np.where(var[i] > 0, np.sqrt(var[i]), 1.0)
        scaler.n_samples_seen_, scaler.n_features_in_ = X.shape[1], X.shape[2]
        Z_dev = scaler.transform(X_dev)
        best: tuple[float, float, LogisticRegression] | None = None
        for j, C in enumerate(Cs):
            lr = _make_probe(C, seed, max_iter, tol)[-1]
            lr.coef_, lr.intercept_ = coef[i, j], intercept[i, j]
            lr.classes_, lr.n_features_in_ = classes, X.shape[2]
            lr.n_iter_ = np.array([n_iter[i, j]], dtype=np.int32)
            acc = accuracy_score(y_dev, lr.predict(Z_dev))
            if best is None or acc > best[1]:
                best = (C, acc, lr)
        C, acc, lr = best
        results.append(
            ProbeResult(
                model=Pipeline([("scaler", scaler), ("logreg", lr)]),
                C=C,
                dev_accuracy=float(acc),
                fit_seconds=seconds,
                n_params=int(lr.coef_.size + lr.intercept_.size),
            )
        )
    return results


def evaluate(model, X, y) -> dict[str, float]:
    """Accuracy and macro-F1 of any fitted classifier with ``predict`` (probes and heads alike).

    Returns
    -------
    dict
        ``{"accuracy": float, "macro_f1": float}``.
    """
    pred = model.predict(X)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
    }


def _layer_loader(
    features: Mapping[int, LayerSplits | Callable[[], LayerSplits]] | Callable[[int], LayerSplits],
    layers: Sequence[int] | None,
) -> tuple[list[int], Callable[[int], LayerSplits]]:
    if callable(features) and not isinstance(features, Mapping):
        if layers is None:
            raise ValueError("layers must be given when features is a callable loader")
        return list(layers), features
    if not isinstance(features, Mapping):
        raise ValueError(
            "features must be a mapping {layer: (X_train, X_dev, X_test) or a zero-argument "
            f"loader}} or a callable layer -> splits, got {type(features).__name__}"
        )
    if layers is None:
        layers = sorted(features)
    unknown = [layer for layer in layers if layer not in features]
    if unknown:
        raise ValueError(f"layers {unknown} are not in features (has {sorted(features)})")

    def load(layer: int) -> LayerSplits:
        value = features[layer]
        return value() if callable(value) else value

    return list(layers), load


def probe_layers(
    features: Mapping[int, LayerSplits | Callable[[], LayerSplits]] | Callable[[int], LayerSplits],
    y_train,
    y_dev,
    y_test,
    *,
    layers: Sequence[int] | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    max_iter: int = 1000,
    on_result: Callable[[int, ProbeResult], None] | None = None,
    solver: str = "torch",
    device=None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> pd.DataFrame:
    """Fit and score one probe per layer, fitting as many layers at once as ``batch_bytes`` allows.

    Parameters
    ----------
    features : mapping or callable
        Either ``{layer: (X_train, X_dev, X_test)}``, ``{layer: loader}`` where
        ``loader()`` returns that tuple, or a callable ``layer -> (X_train, X_dev, X_test)``
        (then ``layers`` is required). Loaders let the caller stream layers from disk.
    y_train, y_dev, y_test : array-like of shape (n_samples,)
    layers : sequence of int, optional
        Layers to probe, in order; defaults to the sorted keys of ``features``.
    Cs, seed, max_iter, solver, device
        As in :func:`fit_probe`.
    on_result : callable, optional
        Called as ``on_result(layer, result)`` after each layer, e.g. to save the probe,
        so that the fitted models need not all be kept.
    batch_bytes : int
        The torch solver stacks consecutive layers' float32 train features up to this size
        (at least one layer) and fits them together; the sklearn solver holds one layer.

    Returns
    -------
    pandas.DataFrame
        One row per layer with columns ``layer, C, dev_accuracy, dev_macro_f1,
        test_accuracy, test_macro_f1, n_params, fit_seconds``.
    """
    Cs = _check_Cs(Cs)
    _check_solver(solver, max_iter)
    layers, load = _layer_loader(features, layers)
    rows = []
    done = 0
    while done < len(layers):
        group, fitted = _fit_group(
            layers[done:], load, y_train, y_dev, Cs=Cs, seed=seed, max_iter=max_iter, solver=solver, device=device, batch_bytes=batch_bytes
        )
        for layer, (res, X_dev, X_test) in zip(group, fitted):
            dev = evaluate(res.model, X_dev, y_dev)
            test = evaluate(res.model, X_test, y_test)
            rows.append(
                {
                    "layer": layer,
                    "C": res.C,
                    "dev_accuracy": dev["accuracy"],
                    "dev_macro_f1": dev["macro_f1"],
                    "test_accuracy": test["accuracy"],
                    "test_macro_f1": test["macro_f1"],
                    "n_params": res.n_params,
                    "fit_seconds": res.fit_seconds,
                }
            )
            done += 1
            logger.debug(
                "layer %s (%d/%d): C=%g dev acc %.4f test acc %.4f (%.2fs)",
                layer,
                done,
                len(layers),
                res.C,
                dev["accuracy"],
                test["accuracy"],
                res.fit_seconds,
            )
            if on_result is not None:
                on_result(layer, res)
        del fitted
    columns = [
        "layer",
        "C",
        "dev_accuracy",
        "dev_macro_f1",
        "test_accuracy",
        "test_macro_f1",
        "n_params",
        "fit_seconds",
    ]
    return pd.DataFrame(rows, columns=columns)


def _fit_group(layers, load, y_train, y_dev, *, Cs, seed, max_iter, solver, device, batch_bytes):
    """Load layers from the front of ``layers`` while they fit in ``batch_bytes`` and fit them.

    Returns the layers taken and ``(result, X_dev, X_test)`` for each; the train matrices
    are copied into one stacked float32 tensor as they load, so they are held once.
    """
    import torch

    t0 = time.perf_counter()
    X_train, X_dev, X_test = load(layers[0])
    if solver == "sklearn":
        res = fit_probe(X_train, y_train, X_dev, y_dev, Cs=Cs, seed=seed, max_iter=max_iter, solver="sklearn")
        return layers[:1], [(res, X_dev, X_test)]
    shape = np.shape(X_train)
    per_layer = 4 * int(np.prod(shape))
    take = max(1, min(len(layers), batch_bytes // max(per_layer, 1)))
    stacked = torch.empty((take, *shape), dtype=torch.float32)
    devs, tests = [], []
    for i, layer in enumerate(layers[:take]):
        if i:
            X_train, X_dev, X_test = load(layer)
            if np.shape(X_train) != shape:
                raise ValueError(f"layer {layer} has train features of shape {np.shape(X_train)}, layer {layers[0]} {shape}")
        stacked[i] = torch.from_numpy(np.asarray(X_train, dtype=np.float32))
        devs.append(X_dev)
        tests.append(X_test)
        del X_train
    results = _fit_stacked(stacked, y_train, devs, y_dev, Cs, seed, max_iter, 1e-4, device, t0)
    return layers[:take], list(zip(results, devs, tests))


def spearman_nu_accuracy(nu: Sequence[float], acc: Sequence[float]) -> float:
    """Spearman rank correlation between per-layer ``nu`` and probe accuracy.

    The variability paper predicts a strongly negative value (low ``nu``, high
    accuracy). ``nu = +inf`` (coinciding class means) ranks above every finite
    value; pairs with a NaN are dropped; fewer than two pairs or a constant
    side give ``nan`` rather than a warning.

    Examples
    --------
    >>> spearman_nu_accuracy([1.0, 2.0, float("inf")], [0.9, 0.8, 0.5])
    -1.0
    """
    nu = np.asarray(nu, dtype=float)
    acc = np.asarray(acc, dtype=float)
    if nu.ndim != 1 or acc.shape != nu.shape:
        raise ValueError(f"nu and acc must be 1-D of equal length, got shapes {nu.shape} and {acc.shape}")
    keep = ~(np.isnan(nu) | np.isnan(acc))
    nu, acc = nu[keep], acc[keep]
    if nu.size < 2:
        return float("nan")
    # rankdata orders +-inf correctly; ranking explicitly keeps the Pearson step finite.
    r_nu, r_acc = stats.rankdata(nu), stats.rankdata(acc)
    if np.all(r_nu == r_nu[0]) or np.all(r_acc == r_acc[0]):
        return float("nan")
    return float(stats.spearmanr(r_nu, r_acc).statistic)


# --- persistence ---------------------------------------------------------------------------


def probe_to_arrays(pipeline: Pipeline) -> tuple[dict[str, np.ndarray], dict]:
    """Split a fitted scaler + logistic-regression pipeline into arrays and JSON-able metadata.

    The arrays are exactly the state ``predict_proba`` reads, so
    :func:`probe_from_arrays` rebuilds a pipeline with bit-identical output.

    Returns
    -------
    arrays : dict of str to ndarray
        ``scaler.mean``, ``scaler.scale``, ``scaler.var``, ``logreg.coef``, ``logreg.intercept``.
    meta : dict
        Format tag, hyper-parameters, class labels and feature count.
    """
    if not isinstance(pipeline, Pipeline) or len(pipeline.steps) != 2:
        raise ValueError("probe_to_arrays expects a Pipeline(StandardScaler, LogisticRegression)")
    scaler, lr = pipeline[0], pipeline[-1]
    if not isinstance(scaler, StandardScaler) or not isinstance(lr, LogisticRegression):
        raise ValueError(
            f"probe_to_arrays expects a Pipeline(StandardScaler, LogisticRegression), got ({type(scaler).__name__}, {type(lr).__name__})"
        )
    check_is_fitted(scaler)
    check_is_fitted(lr)
    arrays = {"logreg.coef": lr.coef_, "logreg.intercept": lr.intercept_}
    for name in ("mean", "scale", "var"):
        value = getattr(scaler, f"{name}_")
        if value is not None:
            arrays[f"scaler.{name}"] = value
    meta = {
        "format": PROBE_FORMAT,
        "version": PROBE_FORMAT_VERSION,
        "step_names": [name for name, _ in pipeline.steps],
        "scaler": {
            "with_mean": scaler.with_mean,
            "with_std": scaler.with_std,
            "n_samples_seen": np.asarray(scaler.n_samples_seen_).tolist(),
        },
        "logreg": {
            "params": {k: lr.get_params()[k] for k in ("C", "max_iter", "tol", "random_state", "solver")},
            "n_iter": np.asarray(lr.n_iter_).tolist(),
        },
        "classes": heads_format.labels_to_json(lr.classes_),
        "n_features_in": int(lr.n_features_in_),
    }
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}, meta


def probe_from_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping) -> Pipeline:
    """Rebuild the pipeline written by :func:`probe_to_arrays` (no pickle involved)."""
    heads_format.check_format(meta, PROBE_FORMAT, PROBE_FORMAT_VERSION, what="probe")
    n_features = int(meta["n_features_in"])
    sm = meta["scaler"]
    scaler = StandardScaler(with_mean=sm["with_mean"], with_std=sm["with_std"])
    scaler.mean_ = np.asarray(arrays["scaler.mean"]) if "scaler.mean" in arrays else None
    scaler.scale_ = np.asarray(arrays["scaler.scale"]) if "scaler.scale" in arrays else None
    scaler.var_ = np.asarray(arrays["scaler.var"]) if "scaler.var" in arrays else None
    scaler.n_samples_seen_ = np.asarray(sm["n_samples_seen"]) if isinstance(sm["n_samples_seen"], list) else sm["n_samples_seen"]
    scaler.n_features_in_ = n_features

    lr = LogisticRegression(**meta["logreg"]["params"])
    lr.coef_ = np.asarray(arrays["logreg.coef"])
    lr.intercept_ = np.asarray(arrays["logreg.intercept"])
    lr.classes_ = heads_format.labels_from_json(meta["classes"])
    lr.n_iter_ = np.asarray(meta["logreg"]["n_iter"], dtype=np.int32)
    lr.n_features_in_ = n_features
    if lr.coef_.shape[1] != n_features:
        raise ValueError(f"probe coef has {lr.coef_.shape[1]} features, meta says {n_features}")
    names = meta.get("step_names", ["scaler", "logreg"])
    return Pipeline([(names[0], scaler), (names[1], lr)])


def probe_to_bytes(pipeline: Pipeline) -> dict[str, bytes]:
    """``{'head.safetensors': ..., 'head.json': ...}`` for a content-addressed store."""
    return heads_format.pack(*probe_to_arrays(pipeline))


def probe_from_bytes(blobs: Mapping[str, bytes]) -> Pipeline:
    """Inverse of :func:`probe_to_bytes`."""
    return probe_from_arrays(*heads_format.unpack(blobs))
