"""An LLMEmbed-style fused head over several frozen models' pooled features.

Liu et al., ACL 2024 ("LLMEmbed") classify with embeddings from a few frozen
models (several late llama2 layers, bert, roberta) by projecting each to a
common width, taking the pairwise co-occurrence (dot products) of the
projected vectors through a scaled sigmoid, and feeding that together with
the averaged llama layers to a small MLP. Only this head trains, which is
why it is cheap; this module is that head on cached arrays.

Differences from the reference code, on purpose:

- every block is standardised with train mean/std and projected (the
  reference leaves bert/roberta-large unprojected because they are already
  1024 wide); blocks of any width can therefore be fused;
- the projected vectors themselves are also fed to the MLP, next to the
  co-occurrence features and the layer average;
- the co-occurrence matrix is symmetric, so only its upper triangle
  *including the diagonal* is kept: ``m (m + 1) / 2`` values carrying every
  pair's interaction and each block's squared norm once (the reference
  flattens all ``m * m`` entries, each off-diagonal pair twice).

Two switches give the ablations the train stage reports: ``cooccurrence=False``
drops the co-occurrence term (``fusion_no_cooc``), and ``projection=False`` as
well feeds the standardised blocks straight to the MLP (``concat_mlp``: the same
MLP on the concatenation). See also :class:`stages.train.concat.ConcatHead`, the
linear baseline, which is re-exported here, and
:class:`stages.train.llmembed.LLMEmbedHead`, the reference head.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from pipeline.head_params import FIT_CONSTRAINTS, FUSION, FUSION_CONSTRAINTS, Constraint, boolean, validate_params
from stages.entries import heads_format
from stages.train._blocks import check_against_fitted, check_blocks, check_labels, check_names
from stages.train.concat import ConcatHead
from stages.train.dropout import Dropout

__all__ = ["FusionHead", "ConcatHead"]

logger = logging.getLogger(__name__)

FUSION_FORMAT = "fusion-head"
FUSION_FORMAT_VERSION = 1


def _is_device(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return False
    return True


TORCH_FIT_CONSTRAINTS: dict[str, Constraint] = {
    **FIT_CONSTRAINTS,
    "device": Constraint(_is_device, "a torch device string such as 'cpu' or 'cuda:0'"),
}
"""What the torch heads take beyond their config fields: weight decay, seed, device."""


class _Standardize(nn.Module):
    """Fixed ``(x - mean) / scale``; buffers so they travel with the state dict."""

    def __init__(self, n_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class _FusionNet(nn.Module):
    """Standardise, project, co-occurrence, concatenate, MLP (see module docstring)."""

    def __init__(
        self,
        dims: Sequence[int],
        avg_idx: Sequence[int],
        n_classes: int,
        *,
        width: int,
        hidden: int,
        dropout: float,
        sigma: float,
        cooccurrence: bool = True,
        projection: bool = True,
    ):
        super().__init__()
        m = len(dims)
        self.sigma = float(sigma)
        self.avg_idx = list(avg_idx)
        self.cooccurrence = cooccurrence
        self.norm = nn.ModuleList(_Standardize(d) for d in dims)
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Linear(d, width), nn.ReLU(), Dropout(dropout)) if projection else nn.Identity() for d in dims
        )
        # Upper triangle incl. diagonal of the symmetric m x m co-occurrence matrix.
        self.register_buffer("pairs", torch.triu_indices(m, m, offset=0), persistent=False)
        n_in = (self.pairs.shape[1] if cooccurrence else 0) + (m * width if projection else sum(dims))
        n_in += dims[self.avg_idx[0]] if self.avg_idx else 0
        self.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), Dropout(dropout), nn.Linear(hidden, n_classes))

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        zs = [norm(x) for norm, x in zip(self.norm, xs)]
        projected = [proj(z) for proj, z in zip(self.proj, zs)]
        parts = []
        if self.cooccurrence:
            P = torch.stack(projected, dim=1)  # (n, m, width)
            C = P @ P.transpose(1, 2)  # (n, m, m)
            co = C[:, self.pairs[0], self.pairs[1]]
            parts.append(2.0 * torch.sigmoid(self.sigma * co) - 1.0)
        parts.append(torch.cat(projected, dim=1))
        if self.avg_idx:
            parts.append(torch.stack([zs[i] for i in self.avg_idx], dim=0).mean(dim=0))
        return self.mlp(torch.cat(parts, dim=1))


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch inside a forked RNG state, restoring the caller's state after.

    CPU kernels used here are deterministic already, so deterministic-algorithm
    mode (whose first use costs ~2 s of imports) is switched on only for
    accelerators, and restored afterwards.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if device.type == "cpu":
            yield
            return
        previous = torch.are_deterministic_algorithms_enabled()
        previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
        # warn_only: on CUDA a few kernels need CUBLAS_WORKSPACE_CONFIG; warn rather than fail.
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


class FusionHead(ClassifierMixin, BaseEstimator):
    """LLMEmbed-style fused classifier over named feature blocks.

    Each block is standardised with its train mean/std and projected to ``width``
    by Linear+ReLU+Dropout. With the ``m`` projected vectors stacked as ``P`` (m, width),
    the co-occurrence ``C = P P^T`` is squashed as ``2 * sigmoid(sigma * C) - 1`` and its
    upper triangle including the diagonal (``m (m + 1) / 2`` values) is concatenated
    with the flattened ``P`` and the average of the standardised ``avg_keys`` blocks;
    an MLP (Linear(hidden)+ReLU+Dropout+Linear(K)) gives the logits. Trained with Adam
    on cross-entropy, early-stopped on dev accuracy, best weights restored.

    Parameters
    ----------
    width : int, default=256
        Common projection width.
    sigma : float, default=0.01
        Scale inside the sigmoid. Dot products of the projected vectors grow with
        ``width``: at ``width=256`` on standardised inputs they are ~15 at initialisation,
        so ``sigma=1`` saturates nearly every co-occurrence value at 1 (a constant
        feature). Use ``sigma`` around ``1 / width`` to keep them informative.
    dropout : float, default=0.1
        Dropout after each projection and in the MLP (at most 0.95).
    hidden : int, default=256
        MLP hidden width.
    epochs : int, default=40
        Maximum passes over the training set.
    lr : float, default=1e-3
        Adam learning rate.
    weight_decay : float, default=0.0
        Adam weight decay.
    batch_size : int, default=64
        Mini-batch size.
    patience : int, default=5
        Epochs without a strict dev-accuracy improvement before stopping.
    seed : int, default=0
        Seeds initialisation, dropout and shuffling; the caller's torch RNG state is restored.
    cooccurrence : bool, default=True
        Feed the co-occurrence term to the MLP (False: the ``fusion_no_cooc`` ablation).
    projection : bool, default=True
        Project each block to ``width``; False feeds the standardised blocks themselves
        (with ``cooccurrence=False``: the ``concat_mlp`` ablation). Co-occurrence needs projection.
    device : str, default="cpu"
        Torch device to train and predict on. Not part of the result: saved heads load on CPU
        unless told otherwise.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    block_names_ : list of str
        Input blocks in the (sorted) order the net sees them.
    block_dims_ : dict of str to int
        Feature count per block; ``predict`` rejects any other.
    avg_keys_ : list of str
        Blocks whose standardised average is fed to the MLP.
    net_ : torch.nn.Module
        The trained network; its state dict holds the standardisation as ``norm.{i}.mean``
        and ``norm.{i}.scale`` buffers.
    n_params_ : int
        Trainable parameters.
    fit_seconds_ : float
    best_epoch_ : int
        1-based epoch whose weights were kept.
    best_dev_accuracy_ : float
    history_ : list of dict
        Per epoch: ``epoch``, ``train_loss``, ``dev_accuracy``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = {"a": rng.normal(size=(200, 4)), "b": rng.normal(size=(200, 3))}
    >>> y = (X["a"][:, 0] > 0).astype(int)
    >>> head = FusionHead(width=8, hidden=16, epochs=3).fit(X, y, X, y)
    >>> head.predict_proba(X).shape
    (200, 2)
    """

    _parameter_constraints: dict[str, Constraint] = {
        **FUSION_CONSTRAINTS,
        **TORCH_FIT_CONSTRAINTS,
        "cooccurrence": boolean(),
        "projection": boolean(),
    }
    _format = FUSION_FORMAT

    def __init__(
        self,
        *,
        width: int = FUSION.width,
        sigma: float = FUSION.sigma,
        dropout: float = FUSION.dropout,
        hidden: int = FUSION.hidden,
        epochs: int = FUSION.epochs,
        lr: float = FUSION.lr,
        weight_decay: float = 0.0,
        batch_size: int = FUSION.batch_size,
        patience: int = FUSION.patience,
        seed: int = 0,
        cooccurrence: bool = True,
        projection: bool = True,
        device: str = "cpu",
    ):
        self.width = width
        self.sigma = sigma
        self.dropout = dropout
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.patience = patience
        self.seed = seed
        self.cooccurrence = cooccurrence
        self.projection = projection
        self.device = device

    # --- fitting -------------------------------------------------------------------------

    def _build_net(self, dims: Sequence[int], avg_idx: Sequence[int], n_classes: int) -> _FusionNet:
        return _FusionNet(
            dims,
            avg_idx,
            n_classes,
            width=self.width,
            hidden=self.hidden,
            dropout=self.dropout,
            sigma=self.sigma,
            cooccurrence=self.cooccurrence,
            projection=self.projection,
        )

    def _validate(self, owner: str) -> None:
        validate_params(owner, self.get_params(), self._parameter_constraints)
        if self.cooccurrence and not self.projection:
            raise ValueError(f"{owner}: cooccurrence=True needs projection=True (blocks of different widths have no dot product)")

    @staticmethod
    def _init_norm(net: nn.Module, train: Mapping[str, np.ndarray], names: Sequence[str]) -> None:
        """Standardise each block with its train mean and std (constant features keep scale 1)."""
        with torch.no_grad():
            for norm, name in zip(net.norm, names):
                block = train[name].astype(np.float64)
                std = block.std(axis=0)
                norm.mean.copy_(torch.from_numpy(block.mean(axis=0)))
                norm.scale.copy_(torch.from_numpy(np.where(std > 0, std, 1.0)))

    def fit(
        self,
        inputs_train: Mapping[str, np.ndarray],
        y_train,
        inputs_dev: Mapping[str, np.ndarray],
        y_dev,
        *,
        avg_keys: Sequence[str] = (),
    ) -> FusionHead:
        """Train on ``inputs_train``, early-stopping on dev accuracy.

        Parameters
        ----------
        inputs_train, inputs_dev : mapping of str to array-like of shape (n_samples, n_features_block)
            The same named blocks in both splits.
        y_train, y_dev : array-like of shape (n_samples,)
            Dev labels must all occur in train.
        avg_keys : sequence of str, default=()
            Blocks (typically the last few llama layers) whose standardised average is
            concatenated before the MLP; they must share a width.

        Returns
        -------
        self
        """
        owner = type(self).__name__
        self._validate(owner)
        train = check_blocks(inputs_train, owner=owner, what="inputs_train")
        dev = check_blocks(inputs_dev, owner=owner, what="inputs_dev")
        dims = {name: block.shape[1] for name, block in train.items()}
        check_against_fitted(dev, dims, owner=owner)
        names = list(train)
        avg = check_names(avg_keys, names, owner=owner, what="avg_keys")
        avg_widths = {k: dims[k] for k in avg}
        if len(set(avg_widths.values())) > 1:
            raise ValueError(f"{owner}: avg_keys blocks must share a width, got {avg_widths}")

        y_train = check_labels(y_train, next(iter(train.values())).shape[0], owner=owner, what="y_train")
        y_dev = check_labels(y_dev, next(iter(dev.values())).shape[0], owner=owner, what="y_dev")
        classes = np.unique(y_train)
        if classes.size < 2:
            raise ValueError(f"{owner}: y_train needs at least 2 classes, got {classes.tolist()}")
        unseen = np.setdiff1d(np.unique(y_dev), classes)
        if unseen.size:
            raise ValueError(f"{owner}: y_dev has labels not in y_train: {unseen.tolist()}")
        codes_train = np.searchsorted(classes, y_train)
        codes_dev = np.searchsorted(classes, y_dev)

        device = torch.device(self.device)
        t0 = time.perf_counter()
        with _seeded(self.seed, device):
            net = self._build_net([dims[n] for n in names], [names.index(k) for k in avg], classes.size)
            self._init_norm(net, train, names)
            net.to(device)
            history, best_epoch, best_acc = self._train(net, train, codes_train, dev, codes_dev, names, device)
        self.fit_seconds_ = time.perf_counter() - t0
        self.classes_ = classes
        self.block_names_ = names
        self.block_dims_ = dims
        self.avg_keys_ = avg
        self.net_ = net.eval()
        self.n_params_ = int(sum(p.numel() for p in net.parameters() if p.requires_grad))
        self.best_epoch_ = best_epoch
        self.best_dev_accuracy_ = best_acc
        self.history_ = history
        logger.info(
            "%s: best dev accuracy %.4f at epoch %d/%d, %d parameters, %.2fs",
            owner,
            best_acc,
            best_epoch,
            len(history),
            self.n_params_,
            self.fit_seconds_,
        )
        return self

    def _train(self, net, train, codes_train, dev, codes_dev, names, device):
        """Adam over shuffled mini-batches; returns (history, best_epoch, best_dev_accuracy)."""
        xs = [torch.from_numpy(train[n]).to(device) for n in names]
        y = torch.from_numpy(codes_train).to(device)
        n = y.shape[0]
        shuffler = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        history: list[dict] = []
        best_acc, best_epoch, best_state = -1.0, 0, None
        for epoch in range(1, self.epochs + 1):
            net.train()
            perm = torch.randperm(n, generator=shuffler).to(device)
            total = 0.0
            for start in range(0, n, self.batch_size):
                idx = perm[start : start + self.batch_size]
                loss = F.cross_entropy(net([x[idx] for x in xs]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.shape[0]
            dev_pred = self._logits(net, dev, names, device).argmax(dim=1).numpy()
            acc = float(np.mean(dev_pred == codes_dev))
            history.append({"epoch": epoch, "train_loss": total / n, "dev_accuracy": acc})
            logger.debug("epoch %d: train loss %.4f dev accuracy %.4f", epoch, total / n, acc)
            if acc > best_acc:
                best_acc, best_epoch = acc, epoch
                best_state = copy.deepcopy(net.state_dict())
            elif epoch - best_epoch >= self.patience:
                break
        net.load_state_dict(best_state)
        return history, best_epoch, best_acc

    # --- prediction ----------------------------------------------------------------------

    @staticmethod
    def _logits(net, blocks, names, device, chunk: int = 4096) -> torch.Tensor:
        """Eval-mode logits on CPU, in fixed-size chunks so results never depend on the caller."""
        net.eval()
        n = blocks[names[0]].shape[0]
        out = []
        with torch.no_grad():
            for start in range(0, n, chunk):
                xs = [torch.from_numpy(blocks[name][start : start + chunk]).to(device) for name in names]
                out.append(net(xs).float().cpu())
        return torch.cat(out, dim=0)

    def _check_inputs(self, inputs) -> dict[str, np.ndarray]:
        check_is_fitted(self)
        owner = type(self).__name__
        blocks = check_blocks(inputs, owner=owner)
        check_against_fitted(blocks, self.block_dims_, owner=owner)
        return blocks

    def predict_proba(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Class probabilities, columns ordered as ``classes_``.

        Returns
        -------
        ndarray of shape (n_samples, n_classes), float64
        """
        blocks = self._check_inputs(inputs)
        device = next(self.net_.parameters()).device
        logits = self._logits(self.net_, blocks, self.block_names_, device)
        return torch.softmax(logits, dim=1).numpy().astype(np.float64)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Most probable class per row."""
        proba = self.predict_proba(inputs)
        return self.classes_[np.argmax(proba, axis=1)]

    # --- persistence ---------------------------------------------------------------------

    def to_bytes(self) -> dict[str, bytes]:
        """``{'head.safetensors': weights, 'head.json': params and meta}``; no pickle."""
        check_is_fitted(self)
        arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in self.net_.state_dict().items()}
        meta = {
            "format": self._format,
            "version": FUSION_FORMAT_VERSION,
            "params": self.get_params(),
            "classes": heads_format.labels_to_json(self.classes_),
            "block_names": self.block_names_,
            "block_dims": self.block_dims_,
            "avg_keys": self.avg_keys_,
            "n_params": self.n_params_,
            "fit_seconds": self.fit_seconds_,
            "best_epoch": self.best_epoch_,
            "best_dev_accuracy": self.best_dev_accuracy_,
            "history": self.history_,
            "torch_version": torch.__version__,
        }
        return heads_format.pack(arrays, meta)

    @classmethod
    def from_bytes(cls, blobs: Mapping[str, bytes], *, device: str | None = None) -> FusionHead:
        """Rebuild a head from :meth:`to_bytes` output; ``device`` overrides the saved one."""
        arrays, meta = heads_format.unpack(blobs)
        heads_format.check_format(meta, cls._format, FUSION_FORMAT_VERSION)
        params = dict(meta["params"])
        params["device"] = device or "cpu"
        head = cls(**params)
        names = list(meta["block_names"])
        dims = {k: int(v) for k, v in meta["block_dims"].items()}
        avg = list(meta["avg_keys"])
        classes = heads_format.labels_from_json(meta["classes"])
        net = head._build_net([dims[n] for n in names], [names.index(k) for k in avg], classes.size)
        net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=True)
        head.classes_ = classes
        head.block_names_ = names
        head.block_dims_ = dims
        head.avg_keys_ = avg
        head.net_ = net.to(torch.device(head.device)).eval()
        head.n_params_ = int(meta["n_params"])
        head.fit_seconds_ = float(meta["fit_seconds"])
        head.best_epoch_ = int(meta["best_epoch"])
        head.best_dev_accuracy_ = float(meta["best_dev_accuracy"])
        head.history_ = list(meta["history"])
        return head
