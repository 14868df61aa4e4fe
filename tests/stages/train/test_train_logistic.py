"""The batched torch logistic solver reaches scikit-learn's optimum for every (layer, C) at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from stages.train._logistic import _eigh, _Problem, fit_batched, standardise

CS = [0.01, 0.1, 1.0, 10.0]


@pytest.fixture(autouse=True)
def one_blas_thread():
    """scikit-learn's OpenMP/BLAS threads, like torch's in the suite-wide fixture: on two
    contended cores a tiny lbfgs iteration was measured 20x slower threaded."""
    with threadpool_limits(1):
        yield


def _layers(n_classes: int, n: int = 240, d: int = 12, n_layers: int = 3, seed: int = 0):
    """Layers of increasing class separation, with one huge, one constant and two collinear features."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    means = rng.normal(size=(n_classes, d))
    mix = rng.normal(size=(d, d))
    layers = []
    for layer in range(n_layers):
        X = rng.normal(size=(n, d)) @ mix + 0.6 * layer * means[y]
        X[:, 0] *= 1e3
        X[:, 1] = 7.0
        X[:, 3] = X[:, 2] * 2 + 0.05 * rng.normal(size=n)
        layers.append(X.astype(np.float32))
    return np.stack(layers), y


def _objective(Z: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, C: float) -> float:
    """scikit-learn's lbfgs objective in float64: mean loss + ||W||^2 / (2 C n)."""
    logits = Z @ coef.T + intercept
    if coef.shape[0] == 1:
        t = logits[:, 0]
        loss = np.logaddexp(0, t) - y * t
    else:
        loss = np.logaddexp.reduce(logits, axis=1) - logits[np.arange(y.size), y]
    return float(loss.mean() + (coef**2).sum() / (2 * C * y.size))


def test_standardise_matches_standard_scaler_and_overwrites_only_when_asked():
    X, _ = _layers(2)
    original = torch.from_numpy(X.copy())
    Z, mean, var = standardise(original)
    assert torch.equal(original, torch.from_numpy(X)) and Z.data_ptr() != original.data_ptr()
    for i in range(X.shape[0]):
        scaler = StandardScaler().fit(X[i].astype(np.float64))
        np.testing.assert_allclose(Z[i].numpy(), scaler.transform(X[i].astype(np.float64)), atol=1e-4)
        np.testing.assert_allclose(mean[i].numpy(), scaler.mean_, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(var[i].numpy(), scaler.var_, rtol=1e-4, atol=1e-6)
    in_place = torch.from_numpy(X.copy())
    Z2, mean2, var2 = standardise(in_place, overwrite=True)
    assert Z2.data_ptr() == in_place.data_ptr()
    assert torch.equal(Z2, Z) and torch.equal(mean2, mean) and torch.equal(var2, var)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_fit_batched_matches_sklearn_lbfgs_on_every_layer_and_C(n_classes):
    X, y = _layers(n_classes)
    Z, mean, var = standardise(torch.from_numpy(X.copy()))
    fit = fit_batched(Z, torch.from_numpy(y), n_classes, CS, tol=1e-5)
    assert fit.converged.all()
    assert fit.coef.shape == (3, len(CS), 1 if n_classes == 2 else n_classes, X.shape[2])
    for layer in range(X.shape[0]):
        scaler = StandardScaler().fit(X[layer].astype(np.float64))
        np.testing.assert_allclose(mean[layer].numpy(), scaler.mean_, rtol=1e-5, atol=1e-4 * np.abs(scaler.mean_).max())
        np.testing.assert_allclose(var[layer].numpy()[2:], scaler.var_[2:], rtol=1e-4)
        Zs = scaler.transform(X[layer].astype(np.float64))
        for j, C in enumerate(CS):
            ref = LogisticRegression(C=C, solver="lbfgs", tol=1e-8, max_iter=10_000).fit(Zs, y)
            coef, intercept = fit.coef[layer, j].double().numpy(), fit.intercept[layer, j].double().numpy()
            if n_classes == 2:
                assert coef.shape == ref.coef_.shape
            # Same optimum: the objectives agree to float32 precision and the weights closely.
            f_new = _objective(Zs, y, coef, intercept, C)
            f_ref = _objective(Zs, y, ref.coef_, ref.intercept_, C)
            assert f_new == pytest.approx(f_ref, rel=1e-5, abs=1e-6), (layer, C)
            np.testing.assert_allclose(coef, ref.coef_, atol=2e-3 * max(1.0, np.abs(ref.coef_).max()))
            np.testing.assert_array_equal(
                (Zs @ coef.T + intercept).argmax(1) if n_classes > 2 else (Zs @ coef.T + intercept)[:, 0] > 0,
                ref.predict(Zs) if n_classes > 2 else ref.predict(Zs) == 1,
            )


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_fit_batched_reaches_tight_tolerances_in_float32(n_classes, seed):
    """Near the optimum a step's decrease of f falls below float32's resolution: with only the
    Armijo test the line search found no decrease and stopped short of the tolerance on 12 of
    these 96 problems (and at |gradient| = 2e-5 with tol 1e-5 on an AMD EPYC); the
    approximate Wolfe test takes such steps on the slope instead."""
    X, y = _layers(n_classes, seed=seed)
    Z, _, _ = standardise(torch.from_numpy(X.copy()))
    fit = fit_batched(Z, torch.from_numpy(y), n_classes, CS, tol=1e-6)
    assert Z.dtype == torch.float32
    assert fit.converged.all(), fit.n_iter


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("overwrite_Z", [False, True])
def test_fit_batched_drops_solved_layers_and_solves_each_as_if_alone(monkeypatch, n_classes, overwrite_Z):
    """Layers need from 3 to 23 iterations here; the solver must go on with fewer layers once
    most are done, and every layer's fit must be the one it gets alone."""
    X, y = _layers(n_classes, n_layers=8)
    Z, _, _ = standardise(torch.from_numpy(X.copy()))
    alone = [fit_batched(Z[i : i + 1].clone(), torch.from_numpy(y), n_classes, CS, tol=1e-5) for i in range(8)]
    batch_sizes = []
    loss_grad = _Problem.loss_grad
    monkeypatch.setattr(_Problem, "loss_grad", lambda self, theta: batch_sizes.append(theta.shape[0]) or loss_grad(self, theta))
    fit = fit_batched(Z.clone(), torch.from_numpy(y), n_classes, CS, tol=1e-5, overwrite_Z=overwrite_Z)
    assert batch_sizes[0] == 8 and min(batch_sizes) < 4
    assert fit.converged.all()
    for i, one in enumerate(alone):
        assert torch.equal(fit.n_iter[i], one.n_iter[0])
        torch.testing.assert_close(fit.coef[i], one.coef[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fit.intercept[i], one.intercept[0], rtol=1e-5, atol=1e-6)


def test_fit_batched_stops_at_max_iter_and_reports_it():
    X, y = _layers(2)
    Z, _, _ = standardise(torch.from_numpy(X.copy()))
    fit = fit_batched(Z, torch.from_numpy(y), 2, [10.0], max_iter=1, tol=1e-8)
    assert (fit.n_iter == 1).all()
    assert not fit.converged.any()


def test_fit_batched_needs_two_classes():
    Z = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="a probe needs at least 2 classes in y_train, got 1"):
        fit_batched(Z, torch.zeros(4, dtype=torch.long), 1, [1.0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_batched_on_cuda_matches_cpu():
    X, y = _layers(3)
    cpu = fit_batched(standardise(torch.from_numpy(X.copy()))[0], torch.from_numpy(y), 3, CS)
    gpu = fit_batched(standardise(torch.from_numpy(X.copy()).cuda())[0], torch.from_numpy(y), 3, CS)
    assert gpu.coef.device.type == "cuda"
    torch.testing.assert_close(gpu.coef.cpu(), cpu.coef, atol=1e-3, rtol=1e-3)


def test_fit_batched_survives_an_eigh_that_does_not_converge(monkeypatch):
    """On the default run LAPACK's batched eigh failed to converge on a SmolLM2 Gram matrix;
    here every batched or float32 call fails the same way and the fit must still be right."""
    real_eigh = torch.linalg.eigh

    def eigh(A, *args, **kwargs):
        if A.dtype != torch.float64 or A.dim() > 2:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (simulated)")
        return real_eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    X, y = _layers(2)
    Z, _, _ = standardise(torch.from_numpy(X.copy()))
    fit = fit_batched(Z, torch.from_numpy(y), 2, CS, tol=1e-5)
    assert fit.converged.all() and fit.coef.dtype == torch.float32
    Zs = StandardScaler().fit_transform(X[2].astype(np.float64))
    ref = LogisticRegression(C=1.0, solver="lbfgs", tol=1e-8, max_iter=10_000).fit(Zs, y)
    np.testing.assert_allclose(fit.coef[2, 2].double().numpy(), ref.coef_, atol=2e-3 * max(1.0, np.abs(ref.coef_).max()))


def test_eigh_decomposes_gram_matrices_in_float32_to_float32_precision():
    """The preconditioner's eigenvectors come from a float32 ``eigh`` (the float64 one cost a
    third of the SmolLM2 sweep); they must still decompose each layer's Gram matrix."""
    X, _ = _layers(2)
    Z, _, _ = standardise(torch.from_numpy(X.copy()))
    G = torch.bmm(Z.transpose(1, 2), Z) / Z.shape[1]
    evals, V = _eigh(G.double())
    assert evals.dtype == V.dtype == torch.float32
    reference = torch.linalg.eigvalsh(G.double())
    np.testing.assert_allclose(evals.double().numpy(), reference.numpy(), atol=1e-5 * float(reference.max()))
    np.testing.assert_allclose((V @ torch.diag_embed(evals) @ V.transpose(1, 2)).numpy(), G.numpy(), atol=1e-5)
    np.testing.assert_allclose((V.transpose(1, 2) @ V).numpy(), np.broadcast_to(np.eye(G.shape[1]), G.shape), atol=1e-5)


def test_eigh_of_a_gram_matrix_that_lapack_could_not_decompose():
    """The layer of the default run that failed: 569 of 576 standardised features constant (the
    first pooling of SmolLM2 read the prepended BOS), the 7 others nearly collinear."""
    a, b, c, e = 1.0000028610229492, -0.0013745306059718132, -0.3906186521053314, 0.921085774898529
    u, w = 0.9999983310699463, 1.0000029802322388
    block = torch.tensor(
        [
            [a, b, b, c, a, -a, a],
            [b, u, u, e, b, -b, b],
            [b, u, u, e, b, -b, b],
            [c, e, e, w, c, -c, c],
            [a, b, b, c, a, -a, a],
            [-a, -b, -b, -c, -a, a, -a],
            [a, b, b, c, a, -a, a],
        ],
        dtype=torch.float64,
    )
    live = torch.tensor([0, 14, 281, 398, 440, 461, 523])
    G = torch.zeros(2, 576, 576, dtype=torch.float64)
    G[0][live.unsqueeze(1), live] = block
    G[1] = torch.eye(576, dtype=torch.float64)
    evals, V = _eigh(G)
    np.testing.assert_allclose((V @ torch.diag_embed(evals) @ V.transpose(1, 2)).numpy(), G.numpy(), atol=1e-10)
    np.testing.assert_allclose((V.transpose(1, 2) @ V).numpy(), np.broadcast_to(np.eye(576), (2, 576, 576)), atol=1e-10)
