"""Shared helpers for the train-stage tests: small synthetic tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def make_xor(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Blocks ``a`` (8 wide) and ``b`` (6 wide); label = sign(<a, w1>) XOR sign(<b, w2>).

    Each block alone, and their concatenation, is linearly uninformative.
    """
    w1 = np.random.default_rng(100).normal(size=8)
    w2 = np.random.default_rng(101).normal(size=6)
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 8)), rng.normal(size=(n, 6))
    y = ((a @ w1 > 0) ^ (b @ w2 > 0)).astype(np.int64)
    return {"a": a, "b": b}, y


@pytest.fixture(scope="session")
def xor_data():
    """(train, dev, test) splits of the XOR task, each ``(blocks, y)``."""
    return make_xor(1000, 0), make_xor(400, 1), make_xor(1000, 2)


FAST_FUSION = dict(width=32, hidden=64, epochs=40, patience=8, lr=3e-3, batch_size=64, sigma=0.05)


def _fusion_kwargs(**overrides) -> dict:
    return {**FAST_FUSION, **overrides}


@pytest.fixture(scope="session")
def fusion_kwargs():
    """One factory for FusionHead settings that learn the XOR task in about a second."""
    return _fusion_kwargs


@pytest.fixture(scope="session")
def fitted_fusion(xor_data):
    from stages.train.fusion import FusionHead

    (Xtr, ytr), (Xdv, ydv), _ = xor_data
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return FusionHead(**_fusion_kwargs()).fit(Xtr, ytr, Xdv, ydv)
    finally:
        torch.set_num_threads(previous)
