"""One forward pass per batch yields every layer's pooled hidden states and FFN activations.

Hidden states come from ``output_hidden_states``; FFN activations are the *input* of each
block's FFN output projection, caught by a forward pre-hook and reduced on the device
(masked mean, masked max, firing counts) before the next block runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pipeline.models.families import Family
from stages.extract import pooling


@dataclass
class BatchFeatures:
    arrays: dict[str, torch.Tensor]  # name -> (B, layers, width), on the device
    fire_count: torch.Tensor  # (n_thresholds, n_layers, ffn) int64
    n_counted: int  # tokens that count for means and firing


@contextlib.contextmanager
def _pooling_threads(device: torch.device):
    """Run the pooling reductions on a quarter of torch's CPU threads (at least one).

    They are memory-bound passes over activations the size of one layer: more threads buy little
    bandwidth, while every parallel region costs a fork/join (spinning threads, and a wait for a
    descheduled one on a busy machine) that the many small reductions would pay per call. On two
    cores this made the reductions about 2.5x cheaper in wall time; the model keeps every thread.
    """
    n = torch.get_num_threads()
    k = max(1, n // 4)
    if device.type != "cpu" or k >= n:
        yield
        return
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class FfnCapture:
    """Forward pre-hooks on every block's FFN output projection; use as a context manager."""

    def __init__(
        self, model: torch.nn.Module, family: Family, poolings: tuple[str, ...], thresholds: tuple[float, ...], magnitude: bool = False
    ):
        """``poolings`` may hold mean, max and, with ``magnitude``, absmax (max of |a|); a token fires at
        threshold t when a > t, or |a| > t with ``magnitude`` (gated FFNs), counted for every threshold at once."""
        if "absmax" in poolings and not magnitude:
            raise ValueError("absmax pooling comes with the magnitude rule")
        self.blocks = list(family.block_list(model))
        self.projections = [family.ffn_projection(b) for b in self.blocks]
        self.poolings = poolings
        self.thresholds = tuple(float(t) for t in thresholds)
        self.magnitude = magnitude
        self.mask: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None  # mask as (B, T, 1) bool, built once per batch
        self.weights: tuple[torch.Tensor, torch.Tensor] | None = None  # pooling.mean_weights(mask), once per batch
        self.counted: pooling.CountedTokens | None = None  # CPU only: where the counted tokens are
        self.workspace = pooling.Workspace()  # scratch reused by every layer and batch
        self.pooled: list[dict[str, torch.Tensor]] = []
        self.fired: list[torch.Tensor] = []
        self._handles: list = []

    def _hook(self, layer: int):
        def hook(module, args):
            with _pooling_threads(args[0].device):
                self._reduce(layer, args[0])

        return hook

    def _reduce(self, layer: int, x: torch.Tensor) -> None:
        out = {}
        if "mean" in self.poolings:
            out["mean"] = pooling.masked_mean(x, self.mask, weights=self.weights)
        if "max" in self.poolings or "absmax" in self.poolings:
            mx, absmx, self.fired[layer] = pooling.masked_max_and_fire_counts(
                x, self.mask, self.thresholds, magnitude=self.magnitude, keep=self.keep, workspace=self.workspace, counted=self.counted
            )
            if "max" in self.poolings:
                out["max"] = mx
            if "absmax" in self.poolings:
                out["absmax"] = absmx
        else:
            self.fired[layer] = pooling.fire_counts(x, self.mask, self.thresholds, magnitude=self.magnitude, workspace=self.workspace)
        self.pooled[layer] = out

    def __enter__(self) -> FfnCapture:
        self._handles = [p.register_forward_pre_hook(self._hook(i)) for i, p in enumerate(self.projections)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.workspace.clear()

    def begin(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self.keep = mask.bool().unsqueeze(-1)
        self.weights = pooling.mean_weights(mask)
        self.counted = pooling.CountedTokens(mask) if mask.device.type == "cpu" else None
        self.pooled = [{} for _ in self.projections]
        self.fired = [None] * len(self.projections)  # type: ignore[list-item]


def forward_features(
    model: torch.nn.Module,
    capture: FfnCapture,
    inputs: dict[str, torch.Tensor],
    special_tokens_mask: torch.Tensor,
    *,
    poolings: tuple[str, ...],
    include_special: bool,
    pooler: bool = False,
    skip_sink: bool = False,
) -> BatchFeatures:
    """Run one batch and reduce everything the store keeps, all on the model's device.

    With ``pooler``, the model's own pooler output (BERT's tanh(W [CLS]), which LLMEmbed uses)
    is kept as ``hidden/pooler`` of shape (B, 1, H): one "layer", so it reads like any other block.
    With ``skip_sink`` (every row starts with a prepended attention sink), ``first`` is the token
    after it: in a causal model the sink's own state is the same vector for every text.
    """
    attention = inputs["attention_mask"]
    mask = pooling.token_masks(attention, special_tokens_mask, include_special)
    capture.begin(mask)
    out = model(**inputs, output_hidden_states=True, return_dict=True)
    hidden = out.hidden_states
    with _pooling_threads(attention.device):
        first, last = pooling.first_last_index(attention)
        if skip_sink:
            first = torch.minimum(first + 1, last)
        rows = torch.arange(attention.shape[0], device=attention.device)
        arrays: dict[str, torch.Tensor] = {}
        if "mean" in poolings:
            arrays["hidden/mean"] = torch.stack([pooling.masked_mean(h, mask, weights=capture.weights) for h in hidden], dim=1)
        if "first" in poolings:
            arrays["hidden/first"] = torch.stack([h[rows, first] for h in hidden], dim=1)
        if "last" in poolings:
            arrays["hidden/last"] = torch.stack([h[rows, last] for h in hidden], dim=1)
        if pooler:
            arrays["hidden/pooler"] = out.pooler_output.unsqueeze(1)
        for name in capture.poolings:
            arrays[f"ffn/{name}"] = torch.stack([p[name] for p in capture.pooled], dim=1)
        arrays["stats/norm_ratio"] = pooling.norm_ratio(hidden, mask)
        fired = torch.stack(capture.fired, dim=1)
    return BatchFeatures(arrays, fired, int(mask.sum().item()))
