"""The linear baseline for fused heads: concatenate the blocks, then probe.

If :class:`stages.train.fusion.FusionHead` cannot beat a dev-tuned logistic
regression on the very same blocks, its co-occurrence features are not
earning their parameters; this head makes that comparison one call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from pipeline.head_params import CS, DEFAULT_CS, integer, validate_params
from stages.entries import heads_format
from stages.train._blocks import check_against_fitted, check_blocks, check_labels
from stages.train.probes import fit_probe, probe_from_arrays, probe_to_arrays

__all__ = ["ConcatHead"]

CONCAT_FORMAT = "concat-head"
CONCAT_FORMAT_VERSION = 1


class ConcatHead(ClassifierMixin, BaseEstimator):
    """Standardised logistic regression on the concatenation of named blocks.

    Blocks are concatenated in sorted name order; ``C`` is chosen on dev accuracy
    by :func:`stages.train.probes.fit_probe`.

    Parameters
    ----------
    Cs : sequence of float, default=(0.01, 0.1, 1.0, 10.0)
        Candidate inverse regularisation strengths.
    seed : int, default=0
    max_iter : int, default=1000

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    block_names_ : list of str
    block_dims_ : dict of str to int
    model_ : sklearn.pipeline.Pipeline
    C_ : float
    dev_accuracy_ : float
    n_params_ : int
    fit_seconds_ : float

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = {"a": rng.normal(size=(100, 4)), "b": rng.normal(size=(100, 3))}
    >>> y = (X["b"][:, 0] > 0).astype(int)
    >>> ConcatHead().fit(X, y, X, y).predict(X).shape
    (100,)
    """

    _parameter_constraints = {
        "Cs": CS,
        "seed": integer(0),
        "max_iter": integer(1),
    }

    def __init__(self, *, Cs: Sequence[float] = DEFAULT_CS, seed: int = 0, max_iter: int = 1000):
        self.Cs = Cs
        self.seed = seed
        self.max_iter = max_iter

    def _concat(self, blocks: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([blocks[name] for name in self.block_names_], axis=1)

    def fit(self, inputs_train, y_train, inputs_dev, y_dev) -> ConcatHead:
        """Fit on train, pick ``C`` on dev; blocks as in :meth:`FusionHead.fit`."""
        owner = type(self).__name__
        validate_params(owner, self.get_params(), self._parameter_constraints)
        train = check_blocks(inputs_train, owner=owner, what="inputs_train", dtype=np.float64)
        dev = check_blocks(inputs_dev, owner=owner, what="inputs_dev", dtype=np.float64)
        dims = {name: block.shape[1] for name, block in train.items()}
        check_against_fitted(dev, dims, owner=owner)
        self.block_names_ = list(train)
        self.block_dims_ = dims
        X_train, X_dev = self._concat(train), self._concat(dev)
        y_train = check_labels(y_train, X_train.shape[0], owner=owner, what="y_train")
        y_dev = check_labels(y_dev, X_dev.shape[0], owner=owner, what="y_dev")
        res = fit_probe(X_train, y_train, X_dev, y_dev, Cs=self.Cs, seed=self.seed, max_iter=self.max_iter)
        self.model_ = res.model
        self.classes_ = res.model.classes_
        self.C_ = res.C
        self.dev_accuracy_ = res.dev_accuracy
        self.n_params_ = res.n_params
        self.fit_seconds_ = res.fit_seconds
        return self

    def _check_inputs(self, inputs) -> np.ndarray:
        check_is_fitted(self)
        owner = type(self).__name__
        blocks = check_blocks(inputs, owner=owner, dtype=np.float64)
        check_against_fitted(blocks, self.block_dims_, owner=owner)
        return self._concat(blocks)

    def predict_proba(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Class probabilities, columns ordered as ``classes_``."""
        X = self._check_inputs(inputs)
        return self.model_.predict_proba(X)

    def predict(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Most probable class per row."""
        X = self._check_inputs(inputs)
        return self.model_.predict(X)

    # --- persistence ---------------------------------------------------------------------

    def to_bytes(self) -> dict[str, bytes]:
        """``{'head.safetensors': ..., 'head.json': ...}``; no pickle."""
        check_is_fitted(self)
        arrays, probe_meta = probe_to_arrays(self.model_)
        params = self.get_params()
        params["Cs"] = [float(c) for c in params["Cs"]]
        meta = {
            "format": CONCAT_FORMAT,
            "version": CONCAT_FORMAT_VERSION,
            "params": params,
            "probe": probe_meta,
            "block_names": self.block_names_,
            "block_dims": self.block_dims_,
            "C": self.C_,
            "dev_accuracy": self.dev_accuracy_,
            "n_params": self.n_params_,
            "fit_seconds": self.fit_seconds_,
        }
        return heads_format.pack(arrays, meta)

    @classmethod
    def from_bytes(cls, blobs: Mapping[str, bytes]) -> ConcatHead:
        """Rebuild a head from :meth:`to_bytes` output."""
        arrays, meta = heads_format.unpack(blobs)
        heads_format.check_format(meta, CONCAT_FORMAT, CONCAT_FORMAT_VERSION)
        params = dict(meta["params"])
        params["Cs"] = tuple(params["Cs"])
        head = cls(**params)
        head.model_ = probe_from_arrays(arrays, meta["probe"])
        head.classes_ = head.model_.classes_
        head.block_names_ = list(meta["block_names"])
        head.block_dims_ = {k: int(v) for k, v in meta["block_dims"].items()}
        head.C_ = float(meta["C"])
        head.dev_accuracy_ = float(meta["dev_accuracy"])
        head.n_params_ = int(meta["n_params"])
        head.fit_seconds_ = float(meta["fit_seconds"])
        return head
