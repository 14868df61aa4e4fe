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


def mean_weights(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``masked_mean`` derives from the mask, computed once per batch: (B, 1, T) weights, (B, 1) counts."""
    m = mask.to(torch.float32)
    return m.unsqueeze(1), m.sum(dim=1, keepdim=True).clamp_min(1.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, *, weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, T, D) x (B, T) -> (B, D), accumulated in float32.

    Positions outside the mask are zeroed rather than multiplied by 0, so a NaN/inf at a
    padded or excluded position (0 * inf = NaN) cannot leak into the mean. ``weights`` is
    ``mean_weights(mask)`` when the caller has it already (one batch, many layers).
    """
    m1, denom = mean_weights(mask) if weights is None else weights
    if x.device.type == "cpu":
        # Fast path: a masked matmul reads x once and copies nothing. Only a non-finite value
        # somewhere can make it differ from the zero-filled path, so that case is redone below.
        # (A sum is non-finite whenever one of its terms is: one reduction checks them all.)
        total = torch.bmm(m1, x.to(torch.float32)).squeeze(1)
        if bool(torch.isfinite(total.sum())):
            return total.div_(denom)
    xf = x.to(torch.float32, copy=True)  # a fresh copy: never write into the model's activations
    xf.masked_fill_(~mask.bool().unsqueeze(-1), 0.0)
    total = torch.bmm(m1, xf).squeeze(1)
    return total / denom


def norm_ratio(hidden, mask: torch.Tensor) -> torch.Tensor:
    """(B, layers): per text and layer, the largest token norm over the median token norm, over counted tokens.

    An attention sink shows as a ratio in the hundreds (one token's state 100x the others');
    a text with one counted token has ratio 1. The median is the lower median for even counts.
    """
    keep = mask.bool()
    out = []
    for h in hidden:
        norms = torch.linalg.vector_norm(h.to(torch.float32), dim=-1)
        top = norms.masked_fill(~keep, float("-inf")).amax(dim=1)
        mid = norms.masked_fill(~keep, float("nan")).nanmedian(dim=1).values
        out.append(top / mid.clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack(out, dim=1)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(dim=1)


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B,) -> (B, D)."""
    return x[torch.arange(x.shape[0], device=x.device), index]


class Workspace:
    """Scratch tensors reused across layers and batches, so the FFN reductions allocate nothing per layer.

    A fresh multi-MiB tensor per layer costs page faults on the CPU (more than the arithmetic);
    here each buffer is one flat tensor grown on demand and viewed at the shape asked for.
    """

    def __init__(self) -> None:
        self._flat: dict[str, torch.Tensor] = {}
        self._consts: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        need = 1
        for n in shape:
            need *= int(n)
        buf = self._flat.get(name)
        if buf is None or buf.numel() < need or buf.dtype != dtype or buf.device != torch.device(device):
            buf = self._flat[name] = torch.empty(max(need, 1), dtype=dtype, device=device)
        return buf[:need].view(shape)

    def const(self, value: float, dtype: torch.dtype, device) -> torch.Tensor:
        """A 0-dim tensor (``torch.where(..., out=)`` takes no Python scalar)."""
        key = (value, dtype, str(device))
        t = self._consts.get(key)
        if t is None:
            t = self._consts[key] = torch.full((), value, dtype=dtype, device=device)
        return t

    def ones(self, n: int, device) -> torch.Tensor:
        """(1, n) float32 ones, cached at the largest n seen."""
        buf = self._flat.get("ones")
        if buf is None or buf.numel() < n or buf.device != torch.device(device):
            buf = self._flat["ones"] = torch.ones(max(n, 1), dtype=torch.float32, device=device)
        return buf[:n].view(1, n)

    def clear(self) -> None:
        self._flat.clear()
        self._consts.clear()


# A float32 matmul over 0/1 values counts exactly below 2**24 terms (and is several times faster
# than an int64 reduction over booleans); above that, counting falls back to the int64 sum.
_EXACT_FLOAT_COUNT = 2**24


def fire_counts(
    x: torch.Tensor, mask: torch.Tensor, thresholds, *, magnitude: bool = False, workspace: Workspace | None = None
) -> torch.Tensor:
    """(B, T, F) -> (len(thresholds), F) int64: counted tokens that fire at each threshold.

    A token fires when ``x > t``, or ``|x| > t`` with ``magnitude`` (the rule for gated FFNs,
    whose product activation carries no information in its sign).
    """
    b, t, f = x.shape
    stat = x.abs() if magnitude else x
    counts = torch.empty((len(thresholds), f), dtype=torch.int64, device=x.device)
    if b * t >= _EXACT_FLOAT_COUNT:
        keep = mask.bool().unsqueeze(-1)
        for i, thr in enumerate(thresholds):
            counts[i] = ((stat > thr) & keep).sum(dim=(0, 1), dtype=torch.int64)
        return counts
    ws = workspace or Workspace()
    fired = ws.get("fired", (b * t, f), torch.float32, x.device)
    weights = mask.to(torch.float32).reshape(1, b * t)
    for i, thr in enumerate(thresholds):
        torch.gt(stat.reshape(b * t, f), thr, out=fired)  # compared in x's dtype, stored as 0.0/1.0
        # mask is 0/1: the matmul adds exactly the fired flags of counted tokens.
        counts[i] = (weights @ fired).squeeze(0).round().to(torch.int64)
    return counts


class CountedTokens:
    """Where a batch's counted tokens are, for reducing them without a masked copy of the batch.

    ``index`` lists the counted (row, position) pairs in row-major order as flat indices into
    (B * T); gathered in that order, the tokens of each row are contiguous, so rows with the
    same number of counted tokens next to each other are one (rows, tokens, F) view of the
    gathered tokens (length-grouped batches make these runs long). Built once per batch.
    """

    def __init__(self, mask: torch.Tensor):
        keep = mask.bool()
        self.shape = tuple(keep.shape)
        self.index = keep.reshape(-1).nonzero().squeeze(1)
        self.n = int(self.index.numel())
        counts = keep.sum(dim=1).tolist()
        self.runs: list[tuple[int, int, int, int]] = []  # (first row, end row, offset in gathered tokens, tokens per row)
        offset = r0 = 0
        for r in range(1, len(counts) + 1):
            if r == len(counts) or counts[r] != counts[r0]:
                self.runs.append((r0, r, offset, counts[r0]))
                offset += (r - r0) * counts[r0]
                r0 = r


# Rows of counted tokens reduced at a time: about one core's L2 cache, so every pass after the
# gather (max, |x|, max, one comparison and one count per threshold) reads the block from cache.
BLOCK_BYTES = 1 << 20


def _counted_max_and_fire_counts(x: torch.Tensor, counted: CountedTokens, thresholds, magnitude: bool, ws: Workspace):
    """The ``counted`` path of ``masked_max_and_fire_counts``, a cache-sized block of rows at a time.

    Each block gathers the counted tokens of a few rows with the same count, takes their row max
    (and the max of ``|x|``) and adds the block's fired flags per threshold to a float32 count,
    exact because every partial sum is an integer below 2**24. Same results as one pass per
    reduction over all tokens, with each block read from memory once.
    """
    b, t, f = x.shape
    flat = x.reshape(b * t, f)
    mx = torch.empty((b, f), dtype=x.dtype, device=x.device)
    absmx = torch.empty((b, f), dtype=x.dtype, device=x.device) if magnitude else None
    acc = torch.zeros((len(thresholds), f), dtype=torch.float32, device=x.device)
    cap = max(1, BLOCK_BYTES // (f * x.element_size()))  # tokens per block
    for r0, r1, off, n in counted.runs:
        # Every row has >= 1 counted token (token_masks falls back to its real tokens).
        step = max(1, cap // n)
        for a in range(r0, r1, step):
            z = min(a + step, r1)
            lo, m = off + (a - r0) * n, (z - a) * n
            xs = ws.get("block", (m, f), x.dtype, x.device)
            torch.index_select(flat, 0, counted.index[lo : lo + m], out=xs)
            # Reducing the outer dim of a (n, rows, F) view is much faster on the CPU than the middle one.
            rows = xs.view(z - a, n, f).permute(1, 0, 2)
            torch.amax(rows, dim=0, out=mx[a:z])
            if magnitude:
                torch.abs(xs, out=xs)  # the signed values are done with
                torch.amax(rows, dim=0, out=absmx[a:z])
            fired = ws.get("block_fired", (m, f), torch.float32, x.device)
            ones = ws.ones(m, x.device)
            for i, thr in enumerate(thresholds):
                torch.gt(xs, thr, out=fired)  # compared in x's dtype, as ``x > threshold``
                acc[i] += (ones @ fired).squeeze(0)
    return mx, absmx, acc.round().to(torch.int64)


def masked_max_and_fire_counts(
    x: torch.Tensor,
    mask: torch.Tensor,
    thresholds,
    *,
    magnitude: bool = False,
    keep: torch.Tensor | None = None,
    workspace: Workspace | None = None,
    counted: CountedTokens | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``masked_max``, the masked max of ``|x|`` (with ``magnitude``, else None) and ``fire_counts``
    at every threshold, in a few passes, with the same results as the separate reductions.

    With ``counted`` (``CountedTokens(mask)``, CPU): gathers the counted tokens a cache-sized block
    of rows at a time, takes each row's max over its contiguous slice of them and counts the fired
    flags of the gathered tokens only. Otherwise: one masked copy where excluded positions are
    -inf, which is never > a finite threshold, so the firing test needs no second mask. ``keep`` is
    ``mask.bool().unsqueeze(-1)`` when the caller has it already; ``workspace`` holds the
    scratch buffers between calls (nothing is allocated at the size of ``x`` when it is given).
    """
    b, t, f = x.shape
    ws = workspace or Workspace()
    if counted is not None and counted.n < _EXACT_FLOAT_COUNT and counted.shape == (b, t):
        return _counted_max_and_fire_counts(x, counted, thresholds, magnitude, ws)
    counts = torch.empty((len(thresholds), f), dtype=torch.int64, device=x.device)
    if keep is None:
        keep = mask.bool().unsqueeze(-1)
    xm = ws.get("masked", (b, t, f), x.dtype, x.device)
    torch.where(keep, x, ws.const(float("-inf"), x.dtype, x.device), out=xm)
    # The max over tokens of the same values as masked_max (max is order-free, NaN propagates alike).
    mx = xm.permute(1, 0, 2).amax(dim=0)
    absmx = None
    if magnitude:
        torch.abs(xm, out=xm)
        xm.masked_fill_(~keep, float("-inf"))
        absmx = xm.permute(1, 0, 2).amax(dim=0)
    n = b * t
    if n >= _EXACT_FLOAT_COUNT:
        for i, thr in enumerate(thresholds):
            counts[i] = (xm > thr).flatten(0, 1).sum(dim=0, dtype=torch.int64)
        return mx, absmx, counts
    ones = ws.ones(n, x.device)
    for i, thr in enumerate(thresholds):
        last = i == len(thresholds) - 1
        fired = xm.view(n, f) if last and x.dtype == torch.float32 else ws.get("fired", (n, f), torch.float32, x.device)
        torch.gt(xm.view(n, f), thr, out=fired)  # compared in x's dtype, as ``xm > threshold``
        counts[i] = (ones @ fired).squeeze(0).round().to(torch.int64)
    return mx, absmx, counts
