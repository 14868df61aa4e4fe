"""The on-device reductions and the batch planner, against plain loops, with left and right padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.extract import pooling
from stages.extract.batching import plan_batches

LENGTHS = [5, 1, 3, 7, 2]
WIDTH = 7


def _batch(padding: str, seed: int = 0):
    """x (B, T, D) with garbage at padded positions, attention and special masks, real spans."""
    g = torch.Generator().manual_seed(seed)
    b = len(LENGTHS)
    x = torch.randn(b, WIDTH, 6, generator=g)
    attention = torch.zeros(b, WIDTH, dtype=torch.long)
    special = torch.ones(b, WIDTH, dtype=torch.long)  # padding is marked special too, as the runner does
    spans = []
    for r, n in enumerate(LENGTHS):
        a = 0 if padding == "right" else WIDTH - n
        attention[r, a : a + n] = 1
        special[r, a : a + n] = 0
        if n >= 3:  # a leading and a trailing special token, like [CLS] ... [SEP]
            special[r, a] = special[r, a + n - 1] = 1
        elif n == 2:  # a leading special only, like <s> + one word
            special[r, a] = 1
        else:  # a single token that is special: the row must fall back to its real tokens
            special[r, a] = 1
        x[r, :a] = 1e4  # padding garbage far larger than any real value
        x[r, a + n :] = 1e4
        spans.append((a, a + n))
    return x, attention, special, spans


def _loop_mask(attention, special, include_special):
    rows = []
    for r in range(attention.shape[0]):
        keep = [bool(attention[r, t]) and (include_special or not special[r, t]) for t in range(attention.shape[1])]
        if not any(keep):
            keep = [bool(attention[r, t]) for t in range(attention.shape[1])]
        rows.append([float(k) for k in keep])
    return torch.tensor(rows)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("include_special", [False, True])
def test_token_masks_match_loop(padding, include_special):
    _, attention, special, _ = _batch(padding)
    mask = pooling.token_masks(attention, special, include_special)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, _loop_mask(attention, special, include_special))
    # never a padded position; a row of only specials falls back to its real tokens
    assert (mask[attention == 0] == 0).all()
    assert (mask.sum(dim=1) >= 1).all()


@pytest.mark.parametrize("padding", ["left", "right"])
def test_first_last_index_match_loop(padding):
    _, attention, _, spans = _batch(padding)
    first, last = pooling.first_last_index(attention)
    assert first.tolist() == [a for a, _ in spans]
    assert last.tolist() == [b - 1 for _, b in spans]
    x, _, _, _ = _batch(padding)
    got = pooling.gather_positions(x, last)
    for r, (_, b) in enumerate(spans):
        assert torch.equal(got[r], x[r, b - 1])


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("include_special", [False, True])
@pytest.mark.parametrize("magnitude", [False, True])
def test_masked_mean_max_fire_match_loop(padding, include_special, magnitude):
    x, attention, special, _ = _batch(padding)
    mask = pooling.token_masks(attention, special, include_special)
    mean = pooling.masked_mean(x, mask)
    mx = pooling.masked_max(x, mask)
    thresholds = (0.25, 0.0, 1.0)
    fired = pooling.fire_counts(x, mask, thresholds, magnitude=magnitude)
    assert fired.dtype == torch.int64 and fired.shape == (len(thresholds), x.shape[2])
    want_fire = np.zeros((len(thresholds), x.shape[2]), dtype=np.int64)
    for r in range(x.shape[0]):
        tokens = [t for t in range(x.shape[1]) if mask[r, t] > 0]
        vals = x[r, tokens].double().numpy()
        total = np.zeros(x.shape[2])
        biggest = np.full(x.shape[2], -np.inf)
        for v in vals:
            total += v
            biggest = np.maximum(biggest, v)
            for i, t in enumerate(thresholds):
                want_fire[i] += (np.abs(v) if magnitude else v) > t
        np.testing.assert_allclose(mean[r].double().numpy(), total / len(tokens), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(mx[r].double().numpy(), biggest)
    np.testing.assert_array_equal(fired.numpy(), want_fire)
    if magnitude:  # the magnitude rule really differs from the signed one on data with negatives
        assert not torch.equal(fired, pooling.fire_counts(x, mask, thresholds))


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("thresholds", [(-0.5,), (0.0,), (0.25,), (0.0, 0.25, 1.0)])
@pytest.mark.parametrize("magnitude", [False, True])
@pytest.mark.parametrize("counted", [False, "one block", "row blocks"])
def test_fused_max_and_fire_counts_equal_separate(padding, thresholds, magnitude, counted, monkeypatch):
    """The capture hook's one-pass max (+ max |a|) + firing counts must equal the separate reductions,
    whether the counted tokens fit one cache-sized block or each row is a block of its own."""
    if counted == "row blocks":
        monkeypatch.setattr(pooling, "BLOCK_BYTES", 1)
    x, attention, special, _ = _batch(padding)
    mask = pooling.token_masks(attention, special, False)
    extra = {"counted": pooling.CountedTokens(mask)} if counted else {}
    mx, absmx, fired = pooling.masked_max_and_fire_counts(x, mask, thresholds, magnitude=magnitude, **extra)
    assert torch.equal(mx, pooling.masked_max(x, mask))
    if magnitude:
        assert torch.equal(absmx, pooling.masked_max(x.abs(), mask))
    else:
        assert absmx is None
    assert torch.equal(fired, pooling.fire_counts(x, mask, thresholds, magnitude=magnitude)) and fired.dtype == torch.int64


def test_norm_ratio_is_max_over_median_of_counted_token_norms():
    x, attention, special, _ = _batch("right")
    mask = pooling.token_masks(attention, special, False)
    x[0, 1] *= 1000.0  # a sink-like token in row 0
    got = pooling.norm_ratio([x, 2 * x], mask)
    assert got.shape == (x.shape[0], 2)
    for r in range(x.shape[0]):
        norms = np.sort([float(x[r, t].double().norm()) for t in range(x.shape[1]) if mask[r, t] > 0])
        want = norms[-1] / norms[(len(norms) - 1) // 2]  # lower median
        np.testing.assert_allclose(got[r].numpy(), [want, want], rtol=1e-5)
    assert got[0, 0] > 100


def test_masked_mean_accumulates_in_float32():
    x = torch.full((1, 4096, 2), 1.0 + 2**-7, dtype=torch.bfloat16)
    mask = torch.ones(1, 4096)
    mean = pooling.masked_mean(x, mask)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, torch.full((1, 2), 1.0 + 2**-7))


def test_masked_mean_ignores_non_finite_padding():
    """Padding may hold inf/NaN (e.g. fp16 overflow on garbage positions); it must not leak into the mean."""
    x, attention, special, spans = _batch("left")
    for r, (a, b) in enumerate(spans):
        x[r, :a] = float("nan")
        if a:
            x[r, 0, 0] = float("inf")
    x[0, spans[0][0], 1] = float("inf")  # an excluded special token ([CLS]-like) of row 0
    mask = pooling.token_masks(attention, special, False)
    assert torch.isfinite(pooling.masked_mean(x, mask)).all()
    assert torch.isfinite(pooling.masked_max(x, mask)).all()
    # ...while a non-finite *counted* token must show, so the runner can report it
    x[3, spans[3][0] + 1, 2] = float("nan")
    bad = ~torch.isfinite(pooling.masked_mean(x, mask))
    assert bad[3, 2] and bad.sum() == 1


# batching -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget,max_batch", [(16, 128), (64, 4), (200, 8), (1000, 1)])
def test_plan_batches_covers_rows_once_within_budget(seed, budget, max_batch):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=int(rng.integers(1, 80)))
    batches = plan_batches(lengths, budget, max_batch)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(len(lengths)))  # every row exactly once
    for b in batches:
        assert 1 <= len(b) <= max_batch
        longest = int(lengths[b].max())
        assert len(b) == 1 or len(b) * longest <= budget
    # longest first: lengths are non-increasing along the plan (length-grouped batches)
    ordered = lengths[rows]
    assert (np.diff(ordered) <= 0).all()
    # greedy: a batch is cut only when the next row would break the budget or the size cap
    for b, nxt in zip(batches, batches[1:]):
        longest = int(lengths[b].max())
        assert len(b) == max_batch or (len(b) + 1) * longest > budget


def test_plan_batches_single_row_over_budget_and_ties():
    lengths = np.array([3, 100, 3, 3, 50])
    batches = plan_batches(lengths, 20, 16)
    assert [b.tolist() for b in batches[:2]] == [[1], [4]]  # over-budget rows alone, longest first
    assert [r for b in batches[2:] for r in b.tolist()] == [0, 2, 3]  # ties keep row order (stable)
    assert plan_batches(np.array([], dtype=np.int64), 20, 16) == []
