"""The LLMEmbed head as its authors built it (Liu et al., ACL 2024; ChunLiu-cs/LLMEmbed-ACL2024).

The reference (``DownstreamModel.py``) takes the last five llama2 layers, each mean-pooled
(4096 wide), bert-large's pooler output and roberta-large's ``<s>`` state (1024 each). Each
llama layer is compressed to 1024 by Linear+ReLU+Dropout(0.5); bert and roberta are already
1024 wide and pass through as they are. With the m = 7 vectors stacked as ``P`` (m, 1024), the
full m x m co-occurrence ``P P^T`` (49 values) goes through ``2 * sigmoid(SIGMA * .) - 1`` and
is concatenated with the raw average of the five llama layers (4096): 4145 inputs to an MLP
1024 -> 256 -> classes with ReLU and Dropout(0.5). Adam, lr 1e-4, batch 1024. Inputs are not
standardised.

Here "1024" is ``width``: by default the widest block that is not averaged (the reference's
bert/roberta width), so every block already that wide passes through and the others are
compressed to it. Two deliberate corrections, and only these:

- **logits into the loss.** The reference ends the network in ``Softmax`` and then applies
  ``CrossEntropyLoss``, which applies log-softmax again: the loss sees probabilities as logits,
  its gradients shrink as the model grows confident, and training stalls. This head returns
  logits; probabilities come from ``predict_proba``.
- **early stopping on dev.** The reference trains a fixed number of epochs and reports the last
  one on its test set (it has no dev split); this head keeps the weights of the best dev epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.head_params import LLMEMBED, LLMEMBED_CONSTRAINTS, Constraint, validate_params
from stages.train.dropout import Dropout
from stages.train.fusion import TORCH_FIT_CONSTRAINTS, FusionHead

__all__ = ["LLMEmbedHead", "REFERENCE_HIDDEN", "reference_width"]

LLMEMBED_FORMAT = "llmembed-head"
REFERENCE_HIDDEN = LLMEMBED.hidden


def reference_width(dims: Sequence[int], avg_idx: Sequence[int]) -> int:
    """The common width the reference uses: the widest non-averaged block (else the averaged width)."""
    others = [d for i, d in enumerate(dims) if i not in set(avg_idx)]
    return max(others) if others else dims[avg_idx[0]]


class _LLMEmbedNet(nn.Module):
    """Compress, full co-occurrence, concatenate the raw llama average, MLP (see module docstring)."""

    def __init__(
        self,
        dims: Sequence[int],
        avg_idx: Sequence[int],
        n_classes: int,
        *,
        width: int,
        hidden: Sequence[int],
        dropout: float,
        sigma: float,
    ):
        super().__init__()
        m = len(dims)
        self.sigma = float(sigma)
        self.avg_idx = list(avg_idx)
        self.compress = nn.ModuleList(
            nn.Identity() if d == width else nn.Sequential(nn.Linear(d, width), nn.ReLU(), Dropout(dropout)) for d in dims
        )
        layers: list[nn.Module] = []
        prev = m * m + (dims[self.avg_idx[0]] if self.avg_idx else 0)
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(), Dropout(dropout)]
            prev = h
        layers.append(nn.Linear(prev, n_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        P = torch.stack([c(x) for c, x in zip(self.compress, xs)], dim=1)  # (n, m, width)
        co = (P @ P.transpose(1, 2)).flatten(1)  # (n, m * m), every pair twice as in the reference
        parts = [2.0 * torch.sigmoid(self.sigma * co) - 1.0]
        if self.avg_idx:
            parts.append(torch.stack([xs[i] for i in self.avg_idx], dim=0).mean(dim=0))
        return self.mlp(torch.cat(parts, dim=1))


class LLMEmbedHead(FusionHead):
    """The reference LLMEmbed head over named blocks, with logits into the loss and dev early stopping.

    ``fit``, ``predict`` and persistence are :class:`FusionHead`'s; ``avg_keys`` names the llama
    layers (compressed into the co-occurrence and averaged raw), every other block is used once.

    Parameters
    ----------
    width : int, default=0
        Common width; 0 = :func:`reference_width` (the widest non-averaged block).
    sigma : float, default=0.01
        SIGMA of ``2 * sigmoid(SIGMA * P) - 1``; a command-line argument of the reference.
    hidden : sequence of int, default=(1024, 256)
        MLP hidden widths.
    dropout : float, default=0.5
    epochs : int, default=300
    lr : float, default=1e-4
    weight_decay : float, default=0.0
    batch_size : int, default=1024
    patience : int, default=30
    seed : int, default=0
    device : str, default="cpu"

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> X = {"l1": rng.normal(size=(64, 8)), "l2": rng.normal(size=(64, 8)), "b": rng.normal(size=(64, 4))}
    >>> y = (X["b"][:, 0] > 0).astype(int)
    >>> head = LLMEmbedHead(hidden=(16, 8), epochs=2).fit(X, y, X, y, avg_keys=["l1", "l2"])
    >>> head.net_.mlp[0].in_features  # 3 x 3 co-occurrence + the 8-wide llama average
    17
    """

    _parameter_constraints: dict[str, Constraint] = {**LLMEMBED_CONSTRAINTS, **TORCH_FIT_CONSTRAINTS}
    _format = LLMEMBED_FORMAT

    def __init__(
        self,
        *,
        width: int = LLMEMBED.width,
        sigma: float = LLMEMBED.sigma,
        hidden: Sequence[int] = LLMEMBED.hidden,
        dropout: float = LLMEMBED.dropout,
        epochs: int = LLMEMBED.epochs,
        lr: float = LLMEMBED.lr,
        weight_decay: float = 0.0,
        batch_size: int = LLMEMBED.batch_size,
        patience: int = LLMEMBED.patience,
        seed: int = 0,
        device: str = "cpu",
    ):
        # FusionHead stores every parameter (its cooccurrence/projection switches are unused here)
        super().__init__(
            width=width,
            sigma=sigma,
            hidden=hidden,
            dropout=dropout,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            patience=patience,
            seed=seed,
            device=device,
        )

    def _build_net(self, dims: Sequence[int], avg_idx: Sequence[int], n_classes: int) -> _LLMEmbedNet:
        width = self.width or reference_width(dims, avg_idx)
        return _LLMEmbedNet(
            dims, avg_idx, n_classes, width=width, hidden=[int(h) for h in self.hidden], dropout=self.dropout, sigma=self.sigma
        )

    def _validate(self, owner: str) -> None:
        validate_params(owner, self.get_params(), self._parameter_constraints)

    @staticmethod
    def _init_norm(net: nn.Module, train: Mapping[str, np.ndarray], names: Sequence[str]) -> None:
        """The reference feeds raw features: nothing to standardise."""
