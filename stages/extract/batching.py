"""Length-grouped, token-budget batches: little compute is spent on padding."""

from __future__ import annotations

import numpy as np


def plan_batches(lengths: np.ndarray, token_budget: int, max_batch_size: int) -> list[np.ndarray]:
    """Row indices per batch, longest first, so that ``batch_size * longest <= token_budget``.

    Sorting by length makes rows of a batch similar in length (padding is small); going
    longest first surfaces an out-of-memory batch at the start rather than at the end.
    A single row longer than the budget still gets a batch of its own.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        size = max(1, min(max_batch_size, token_budget // max(longest, 1)))
        batches.append(order[start : start + size])
        start += size
    return batches
