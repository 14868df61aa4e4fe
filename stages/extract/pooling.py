"""Reductions over real tokens, done on the device so token tensors never reach the host."""

from __future__ import annotations

import torch


def token_masks(attention_mask: torch.Tensor, special_tokens_mask: torch.Tensor, include_special: bool) -> torch.Tensor:
    """Float mask of the tokens that count for mean pooling and firing counts.

    Padding never counts; special tokens count only if asked. A row whose tokens are all
    special (possible after extreme truncation) falls back to all of its real tokens.
    """
    real = attention_mask.bool()
    keep = real if include_special else real & ~special_tokens_mask.bool()
    empty = ~keep.any(dim=1, keepdim=True)
    keep = torch.where(empty, real, keep)
    return keep.to(torch.float32)


def first_last_index(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the first and last non-padding token; right or left padding alike."""
    real = attention_mask.bool()
    t = real.shape[1]
    pos = torch.arange(t, device=real.device).expand_as(real)
    first = torch.where(real, pos, t).amin(dim=1)
    last = torch.where(real, pos, -1).amax(dim=1)
    return first, last


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D) x (B, T) -> (B, D), accumulated in float32.

    Positions outside the mask are zeroed rather than multiplied by 0, so a NaN/inf at a
    padded or excluded position (0 * inf = NaN) cannot leak into the mean.
    """
    m = mask.to(torch.float32)
    denom = m.sum(dim=1, keepdim=True).clamp_min(1.0)
    if x.device.type == "cpu":
        # Fast path: a masked matmul reads x once and copies nothing. Only a non-finite value
        # somewhere can make it differ from the zero-filled path, so that case is redone below.
        total = torch.bmm(m.unsqueeze(1), x.to(torch.float32)).squeeze(1)
        if bool(torch.isfinite(total).all()):
            return total / denom
    xf = x.to(torch.float32, copy=True)  # a fresh copy: never write into the model's activations
    xf.masked_fill_(~mask.bool().unsqueeze(-1), 0.0)
    total = torch.bmm(m.unsqueeze(1), xf).squeeze(1)
    return total / denom


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(dim=1)


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B,) -> (B, D)."""
    return x[torch.arange(x.shape[0], device=x.device), index]


def fire_counts(x: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, T, F) -> (F,) int64: how many counted tokens have activation > threshold."""
    fired = (x > threshold) & mask.bool().unsqueeze(-1)
    return fired.sum(dim=(0, 1), dtype=torch.int64)


def masked_max_and_fire_counts(x: torch.Tensor, mask: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``masked_max`` and ``fire_counts`` from one masked copy of ``x`` (same results, fewer passes).

    Excluded positions become -inf, which is never > a finite threshold, so the firing test
    needs no second mask; counting is a sum over the fired booleans.
    """
    xm = x.masked_fill(~mask.bool().unsqueeze(-1), float("-inf"))
    fired = (xm > threshold).flatten(0, 1)
    if fired.shape[0] < 2**24:
        # A float32 matmul with a ones row counts exactly below 2**24 and is several times
        # faster than an int64 reduction over booleans.
        ones = torch.ones((1, fired.shape[0]), dtype=torch.float32, device=x.device)
        counts = (ones @ fired.to(torch.float32)).squeeze(0).round().to(torch.int64)
    else:
        counts = fired.sum(dim=0, dtype=torch.int64)
    return xm.amax(dim=1), counts
