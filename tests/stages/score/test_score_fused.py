"""The fused score passes give what the separate calls give (score's reads: test_score_scan.py)."""

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest

import stages.score.sparsity as sparsity_mod
import stages.score.variability as variability_mod
from stages.score.sparsity import SparsityPlan, sparsity_stats
from stages.score.variability import VariabilityPlan, variability_by_layer, variability_many


def _poolings(seed, n=203, L=5, d=48, K=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    arrays = {}
    for p, spread in (("mean", 0.5), ("first", 0.1), ("last", 2.0)):
        X = rng.normal(size=(n, L, d)) * rng.uniform(0.5, 2, size=d) + rng.normal(size=(K, L, d))[y] * spread + 3.0
        arrays[p] = X.astype(np.float16)
    return arrays, y


def _same(a, b):
    assert [r.rank for r in a] == [r.rank for r in b]
    for r, s in zip(a, b):
        assert (r.n_rows, r.n_classes) == (s.n_rows, s.n_classes)
        assert r.nu == s.nu or r.nu == pytest.approx(s.nu, rel=1e-12)


@pytest.mark.parametrize("chunks", [(64, -1, -1), (37, 2, 17), (500, 1, -1)])
def test_variability_many_equals_separate_calls(chunks):
    arrays, y = _poolings(0)
    lazy = {p: da.from_array(X, chunks=chunks) for p, X in arrays.items()}
    fused = variability_many(lazy, y)
    assert list(fused) == list(arrays)
    for p, X in arrays.items():
        _same(fused[p], variability_by_layer(da.from_array(X, chunks=(101, -1, -1)), y))
        _same(fused[p], variability_by_layer(X, y, scheduler="sync"))


def test_variability_many_checks_rows():
    arrays, y = _poolings(1)
    arrays["short"] = arrays["mean"][:-1]
    with pytest.raises(ValueError, match="rows"):
        variability_many(arrays, y)


def test_blocks_smaller_than_chunk_give_the_same_numbers(monkeypatch):
    arrays, y = _poolings(2, n=300, K=6)
    whole = variability_many(arrays, y)
    monkeypatch.setattr(variability_mod, "BLOCK_BYTES", 1)  # one row per inner block
    for p in arrays:
        _same(variability_many(arrays, y)[p], whole[p])


def test_many_chunks_tree_sum_and_results():
    arrays, y = _poolings(3, n=331)
    lazy = {p: da.from_array(X, chunks=(7, -1, -1)) for p, X in arrays.items()}  # 48 chunks: 2 tree levels
    fused = variability_many(lazy, y)
    for p, X in arrays.items():
        _same(fused[p], variability_by_layer(X, y))


def _ffn(seed, n=150, L=3, F=70):
    rng = np.random.default_rng(seed)
    ffn_max = rng.normal(size=(n, L, F)).astype(np.float16)
    ffn_max[rng.random((n, L, F)) < 0.02] = np.nan
    ffn_max[0, 0, :4] = [np.inf, -np.inf, -0.0, 0.0]
    fire = rng.integers(0, 50, size=(4, L, F))
    return fire, rng.integers(100, 200, 4), ffn_max, rng.integers(0, 4, n), rng.random(n) < 0.3


def test_sparsity_plan_fuses_with_variability_pass():
    arrays, y = _poolings(4, n=150, K=4)
    fire, ntok, ffn_max, _, kw = _ffn(4)
    plan = VariabilityPlan(arrays, y)
    sp = SparsityPlan(fire, ntok, da.from_array(ffn_max, chunks=(40, 2, 33)), y, kw, 0.25)
    (sums,) = dask.compute(plan.first_pass())
    sq, values = dask.compute(plan.second_pass(sums), sp.lazy())
    fused = plan.results(sq)
    for p, X in arrays.items():
        _same(fused[p], variability_by_layer(X, y))
    for got, want in zip(sp.finish(values), sparsity_stats(fire, ntok, ffn_max, y, kw, 0.25)):
        pd.testing.assert_frame_equal(got, want)


@pytest.mark.parametrize("threshold", [0.0, 0.1, float(np.float16(0.1)), 1e-7, 3.0, 65504.0, 7e4, np.inf, -0.5, -1e9])
def test_float16_firing_is_exactly_the_float64_comparison(threshold):
    # every float16 bit pattern, NaNs and infinities included
    values = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    ffn_max = values.reshape(-1, 1, 1)
    labels = np.arange(values.size) % 2
    kw = np.arange(values.size) % 3 == 0
    got = sparsity_mod._count_block(ffn_max, labels, kw, 2, threshold)[0, :, 0, 0]
    fired = values.astype(np.float64) > np.float64(threshold)
    assert got.tolist() == [fired[labels == 0].sum(), fired[labels == 1].sum(), fired[kw].sum()]
