"""Batched L2-regularised logistic regression in torch: many layers and many ``C`` at once.

Every probe of one model and pooling solves the same kind of problem on a different
layer's features, and the ``C`` sweep solves it again with a different penalty. Sweeping
them one scikit-learn fit at a time streams each layer's design matrix through memory once
per iteration per ``C``; here one ``bmm`` per iteration serves all layers and all ``C``
(the weights of every ``C`` sit side by side as columns), so an iteration costs about what
one fit's iteration costs. Layers whose problems are all solved leave the batch (once a
quarter of them have), so a slow layer does not keep the finished ones streaming.

The objective is scikit-learn's for ``LogisticRegression(solver="lbfgs")``:
``mean(loss) + ||W||^2 / (2 C n)`` with an unpenalised intercept, the binary loss (one
weight vector) for two classes and the multinomial loss (one vector per class) for more.

The solver is L-BFGS in preconditioned coordinates: with ``S = Z^T Z / n`` (standardised
features) and ``S = V diag(lam) V^T``, the Hessian at ``W = 0`` is ``c S + I / (C n)``
(``c = 1/4`` binary, ``1/K`` on the centred class directions of the multinomial), so
``W = V diag((c lam + 1/(C n))^-1/2) U`` makes the first step an exact Newton step and
keeps the badly conditioned directions of real hidden states (a few huge dimensions,
many nearly collinear ones) from costing hundreds of iterations. One ``d x d`` Gram matrix
and one ``eigh`` per layer pay for it. A step is accepted on Armijo's decrease of ``f``, or,
once that decrease is below float32's rounding of ``f``, on Hager and Zhang's approximate
Wolfe test of the slope, so float32 still reaches tolerances of 1e-6.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_HISTORY = 10
_ARMIJO = 1e-4
_MAX_BACKTRACK = 30
# Hager and Zhang's approximate Wolfe conditions (SIAM J. Optim. 2005), for steps whose
# decrease of f is below what float32 can resolve: the slope must have fallen from
# phi'(0) into [_WOLFE * phi'(0), (2 _HZ_DELTA - 1) phi'(0)] while f rose by no more than
# its rounding error (_F_ULPS float epsilons of |f|).
_HZ_DELTA = 0.1
_WOLFE = 0.9
_F_ULPS = 16


@dataclass(frozen=True)
class BatchedFit:
    """Weights of ``L`` layers x ``m`` values of ``C`` in the standardised feature space.

    ``coef`` is ``(L, m, k, d)`` and ``intercept`` ``(L, m, k)`` with ``k = 1`` for two
    classes (scikit-learn's binary layout) and ``k = K`` otherwise; ``n_iter`` and
    ``converged`` are ``(L, m)``.
    """

    coef: torch.Tensor
    intercept: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor


def standardise(X: torch.Tensor, *, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Z, mean, var)`` for ``X`` of shape ``(L, n, d)``, StandardScaler's convention.

    Two passes (mean, then the centred second moment) keep float32 accurate; a constant
    feature gets scale 1, as scikit-learn does, so it stays zero. With ``overwrite``, ``Z`` is
    ``X`` itself, standardised in place; either way no temporary is larger than one layer, so
    the features of a batch are held once (twice without ``overwrite``), not three times.
    """
    mean = X.mean(dim=1, keepdim=True)
    X = X.sub_(mean) if overwrite else X - mean
    var = torch.stack([x.square().mean(dim=0) for x in X]).unsqueeze(1)
    scale = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
    X /= scale
    return X, mean.squeeze(1), var.squeeze(1)


class _Problem:
    """Loss and gradient of every (layer, C) problem, and the change of coordinates.

    Parameters live as ``theta (L, d + 1, m, k)`` (the last row is the intercept), so that
    every product with the features or the eigenvectors is one plain ``bmm``.
    """

    def __init__(self, Z: torch.Tensor, y: torch.Tensor, n_classes: int, inv_C: torch.Tensor):
        L, n, d = Z.shape
        self.Z, self.n, self.d = Z, n, d
        self.m = inv_C.numel()
        self.binary = n_classes == 2
        self.k = 1 if self.binary else n_classes
        self.lam = (inv_C / n).to(Z.dtype)  # (m,) penalty weight on the mean loss
        if self.binary:
            self.target = y.to(Z.dtype).view(1, 1, n)
            curvature = 0.25
        else:
            self.onehot = torch.nn.functional.one_hot(y, n_classes).to(Z.dtype).T.reshape(1, 1, n_classes, n)
            curvature = 1.0 / n_classes
        gram = torch.bmm(Z.transpose(1, 2), Z) / n
        evals, V = _eigh(gram)  # (L, d), (L, d, d)
        self.V = V.to(Z.dtype)
        evals = evals.clamp_min(0).to(Z.dtype)
        # (L, d, m, 1): inverse square root of the Hessian at W = 0 along each eigenvector.
        self.D = (curvature * evals.unsqueeze(2) + self.lam.view(1, 1, -1)).rsqrt().unsqueeze(-1)
        self.Db = curvature**-0.5

    def subset(self, keep: torch.Tensor, *, overwrite: bool) -> _Problem:
        """The same problems restricted to the layers ``keep`` (ascending).

        Their features are copied, or with ``overwrite`` moved to the front of ``Z`` in place,
        which needs no memory beyond ``Z``'s own.
        """
        sub = copy.copy(self)
        if overwrite:
            for j, i in enumerate(keep.tolist()):
                if i != j:
                    self.Z[j].copy_(self.Z[i])
            sub.Z = self.Z[: keep.numel()]
        else:
            sub.Z = self.Z[keep]
        sub.V, sub.D = self.V[keep], self.D[keep]
        return sub

    def weights(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``theta`` -> ``W (L, d, m, k)``, ``b (L, m, k)`` in the standardised space."""
        L, d, m, k = theta.shape[0], self.d, self.m, self.k
        W = torch.bmm(self.V, (self.D * theta[:, :d]).reshape(L, d, m * k)).view(L, d, m, k)
        return W, theta[:, d] * self.Db

    def loss_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(f (L, m), grad wrt theta, max |grad| wrt (W, b) (L, m))``."""
        L, d, m, k, n = theta.shape[0], self.d, self.m, self.k, self.n
        W, b = self.weights(theta)
        # Problems x samples, (L, m, k, n): both products below then read Z row-major with the
        # small operand on the left, which CPU BLAS ran 2x (logits) and 7x (gradient) faster
        # than Z @ W and Z^T @ G on SmolLM2's 31 x 6920 x 576 features.
        Wt = W.view(L, d, m * k).transpose(1, 2).contiguous()
        logits = torch.bmm(Wt, self.Z.transpose(1, 2)).view(L, m, k, n) + b.unsqueeze(-1)
        if self.binary:
            t = logits.squeeze(2)
            data = (torch.nn.functional.softplus(t) - self.target * t).mean(dim=-1)
            G = (torch.sigmoid(t) - self.target).unsqueeze(2)
        else:
            lse = torch.logsumexp(logits, dim=2)
            data = (lse - (logits * self.onehot).sum(2)).mean(dim=-1)
            G = torch.softmax(logits, dim=2) - self.onehot
        lam = self.lam.view(1, 1, m, 1)
        f = data + 0.5 * self.lam.view(1, m) * W.square().sum(dim=(1, 3))
        gW = torch.bmm(G.reshape(L, m * k, n), self.Z).transpose(1, 2).reshape(L, d, m, k) / n + lam * W
        gb = G.mean(dim=-1)
        gmax = torch.maximum(gW.abs().amax(dim=(1, 3)), gb.abs().amax(dim=-1))
        g_rot = torch.bmm(self.V.transpose(1, 2), gW.view(L, d, m * k)).view(L, d, m, k)
        g_theta = torch.cat([self.D * g_rot, (gb * self.Db).unsqueeze(1)], dim=1)
        return f, g_theta, gmax


def _eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of the Gram matrices in float32, with a float64 fallback.

    float32 is enough: the eigenvectors only precondition L-BFGS, which converges to the
    same optimum either way (same iterations on the default's SmolLM2 and MiniLM sweeps),
    and it halves the sweep's largest single cost (31 SmolLM2 Gram matrices: 1.75 s in
    float64, 0.7 s in float32). On the default run LAPACK failed to converge (in float32 and
    in float64) on a SmolLM2 Gram matrix whose features were constant but for 7 of 576: the
    zero rows of constant features give hundreds of repeated zero eigenvalues. Where the
    batched call fails, each layer is decomposed in float64 on its non-constant block, with
    unit eigenvectors (eigenvalue 0) for the constant features, which is the same
    decomposition.
    """
    try:
        return _eigh_single_thread(A.float())
    except torch.linalg.LinAlgError:
        logger.debug("batched eigh did not converge; decomposing each layer's non-constant block")
    A = A.double()
    L, d, _ = A.shape
    evals = A.new_zeros(L, d)
    V = torch.eye(d, dtype=A.dtype, device=A.device).repeat(L, 1, 1)
    for i in range(L):
        live = torch.nonzero(A[i].diagonal() > 0).flatten()
        if live.numel():
            e, v = _eigh_single_thread(A[i][live][:, live])
            evals[i, live] = e
            V[i][live.unsqueeze(1), live] = v
    return evals, V


def _eigh_single_thread(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """On a CPU in one thread, since threaded LAPACK eigh on a busy machine was measured
    20x slower than the same call single-threaded."""
    if A.device.type != "cpu":
        return torch.linalg.eigh(A)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(A)
    finally:
        torch.set_num_threads(previous)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=(1, 3))


def _bc(x: torch.Tensor) -> torch.Tensor:
    """A per-problem ``(L, m)`` value broadcast against ``(L, d + 1, m, k)``."""
    return x[:, None, :, None]


def fit_batched(
    Z: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    Cs: list[float],
    *,
    max_iter: int = 1000,
    tol: float = 1e-4,
    overwrite_Z: bool = False,
) -> BatchedFit:
    """Fit ``len(Cs)`` logistic regressions on each of ``L`` standardised layers at once.

    Parameters
    ----------
    Z : tensor of shape (L, n, d)
        Standardised features, on the device the fit should run on.
    y : tensor of shape (n,)
        Class indices ``0 .. n_classes - 1``.
    Cs : list of float
        Inverse regularisation strengths, one problem column each.
    max_iter, tol
        As scikit-learn's lbfgs: stop a problem once ``max |gradient| <= tol``.
    overwrite_Z : bool
        Reuse ``Z``'s memory for the layers still being solved once others are done (as
        scipy's ``overwrite_a``): ``Z`` holds garbage afterwards. Otherwise those layers'
        features are copied.
    """
    if n_classes < 2:
        raise ValueError(f"a probe needs at least 2 classes in y_train, got {n_classes}")
    inv_C = torch.tensor([1.0 / c for c in Cs], dtype=Z.dtype, device=Z.device)
    full = prob = _Problem(Z, y.to(Z.device), n_classes, inv_C)
    L, m, d, k = Z.shape[0], prob.m, prob.d, prob.k
    theta = torch.zeros(L, d + 1, m, k, dtype=Z.dtype, device=Z.device)
    f, g, gmax = prob.loss_grad(theta)
    active = gmax > tol
    n_iter = torch.zeros(L, m, dtype=torch.long, device=Z.device)
    # Layers still being solved (positions in Z) and the results of those that are done.
    rows = torch.arange(L, device=Z.device)
    out_theta, out_gmax, out_iter = theta.clone(), gmax.clone(), n_iter.clone()
    S: list[torch.Tensor] = []
    Y: list[torch.Tensor] = []
    rho: list[torch.Tensor] = []
    gamma = torch.ones(L, m, dtype=Z.dtype, device=Z.device)
    it = 0
    while it < max_iter and bool(active.any()):
        it += 1
        # Two-loop recursion, batched over problems; converged problems get a zero direction.
        q = -g
        alphas = []
        for s, yv, r in zip(reversed(S), reversed(Y), reversed(rho)):
            a = r * _dot(s, q)
            q = q - _bc(a) * yv
            alphas.append(a)
        q = q * _bc(gamma)
        for s, yv, r, a in zip(S, Y, rho, reversed(alphas)):
            bcoef = r * _dot(yv, q)
            q = q + _bc(a - bcoef) * s
        p = torch.where(_bc(active), q, torch.zeros_like(q))
        slope = _dot(g, p)
        bad = slope >= 0  # not a descent direction (lost curvature): restart from the gradient
        if bool((bad & active).any()):
            p = torch.where(_bc(bad & active), -g, p)
            slope = _dot(g, p)
        step = torch.ones_like(f)
        pending = active.clone()
        new_theta, new_f, new_g, new_gmax = theta, f, g, gmax
        f_noise = _F_ULPS * torch.finfo(Z.dtype).eps * f.abs()
        for _ in range(_MAX_BACKTRACK):
            trial = theta + _bc(step) * p
            tf, tg, tgmax = prob.loss_grad(trial)
            t_slope = _dot(tg, p)
            armijo = tf <= f + _ARMIJO * step * slope
            approx_wolfe = (tf <= f + f_noise) & (t_slope >= _WOLFE * slope) & (t_slope <= (2 * _HZ_DELTA - 1) * slope)
            ok = pending & (armijo | approx_wolfe)
            sel = _bc(ok)
            new_theta = torch.where(sel, trial, new_theta)
            new_g = torch.where(sel, tg, new_g)
            new_f = torch.where(ok, tf, new_f)
            new_gmax = torch.where(ok, tgmax, new_gmax)
            pending = pending & ~ok
            if not bool(pending.any()):
                break
            step = torch.where(pending, step * 0.5, step)
        # A problem whose line search found no decrease is at the float precision floor.
        stalled = pending
        s_new, y_new = new_theta - theta, new_g - g
        sy = _dot(s_new, y_new)
        keep = active & ~stalled & (sy > 0)
        r_new = torch.where(keep, 1.0 / torch.where(keep, sy, torch.ones_like(sy)), torch.zeros_like(sy))
        S.append(torch.where(_bc(keep), s_new, torch.zeros_like(s_new)))
        Y.append(torch.where(_bc(keep), y_new, torch.zeros_like(y_new)))
        rho.append(r_new)
        yy = _dot(y_new, y_new)
        gamma = torch.where(keep, sy / torch.where(keep, yy, torch.ones_like(yy)), gamma)
        if len(S) > _HISTORY:
            S.pop(0), Y.pop(0), rho.pop(0)
        n_iter += active.long()
        theta, f, g, gmax = new_theta, new_f, new_g, new_gmax
        if bool(stalled.any()):
            logger.debug("%d probe(s) stopped at the float precision floor", int(stalled.sum()))
        active = active & ~stalled & (gmax > tol)
        live = active.any(dim=1)
        if 0 < int(live.sum()) <= 3 * live.numel() // 4:
            # Every product streams all layers' features, solved or not, and one hard layer can
            # need 10x the iterations of the rest (SmolLM2's last-token layer 1: 94 vs 10-27):
            # once a quarter of the layers are done, go on with the others' features only.
            out_theta[rows], out_gmax[rows], out_iter[rows] = theta, gmax, n_iter
            idx = torch.nonzero(live).flatten()
            rows, prob = rows[idx], prob.subset(idx, overwrite=overwrite_Z)
            theta, f, g, gmax, active, n_iter, gamma = (x[idx] for x in (theta, f, g, gmax, active, n_iter, gamma))
            S, Y, rho = [s[idx] for s in S], [yv[idx] for yv in Y], [r[idx] for r in rho]
    out_theta[rows], out_gmax[rows], out_iter[rows] = theta, gmax, n_iter
    W, b = full.weights(out_theta)
    return BatchedFit(coef=W.permute(0, 2, 3, 1).contiguous(), intercept=b.contiguous(), n_iter=out_iter, converged=out_gmax <= tol)
