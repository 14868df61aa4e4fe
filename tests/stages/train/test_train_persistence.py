"""Heads round-trip through safetensors + JSON with bit-identical probabilities, no pickle."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors import safe_open

from stages.train.fusion import ConcatHead, FusionHead
from stages.train.probes import (
    fit_probe,
    load_probe,
    probe_from_arrays,
    probe_from_bytes,
    probe_to_arrays,
    probe_to_bytes,
    save_probe,
)


def _assert_safe_files(directory):
    """Exactly one safetensors file and one JSON file, neither a pickle."""
    assert sorted(p.name for p in directory.iterdir()) == ["head.json", "head.safetensors"]
    raw = (directory / "head.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header and all("dtype" in v for k, v in header.items() if k != "__metadata__")
    with safe_open(str(directory / "head.safetensors"), framework="numpy") as fh:
        assert sorted(fh.keys()) == sorted(k for k in header if k != "__metadata__")
    meta = json.loads((directory / "head.json").read_text())
    for blob in (raw, (directory / "head.json").read_bytes()):
        assert not blob.startswith(b"\x80")  # pickle protocol >= 2 opcode
    return meta


@pytest.mark.parametrize("labels", ["int3", "binary", "str"])
def test_probe_roundtrip_is_identical(tmp_path, labels):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6))
    y = rng.integers(0, 3, size=300)
    X[:, 0] += y
    if labels == "binary":
        y = (y > 0).astype(int)
    elif labels == "str":
        y = np.array(["neg", "neu", "pos"])[y]
    model = fit_probe(X[:200], y[:200], X[200:], y[200:]).model
    expected = model.predict_proba(X)

    assert np.array_equal(probe_from_arrays(*probe_to_arrays(model)).predict_proba(X), expected)
    assert np.array_equal(probe_from_bytes(probe_to_bytes(model)).predict_proba(X), expected)
    save_probe(model, tmp_path / "probe")
    meta = _assert_safe_files(tmp_path / "probe")
    assert meta["format"] == "linear-probe"
    loaded = load_probe(tmp_path / "probe")
    assert np.array_equal(loaded.predict_proba(X), expected)
    assert np.array_equal(loaded.predict(X), model.predict(X))


def test_fusion_roundtrip_is_identical(tmp_path, xor_data, fitted_fusion):
    _, _, (Xte, _) = xor_data
    expected = fitted_fusion.predict_proba(Xte)
    fitted_fusion.save(tmp_path / "fusion")
    meta = _assert_safe_files(tmp_path / "fusion")
    assert meta["format"] == "fusion-head"
    assert meta["block_names"] == ["a", "b"] and meta["params"]["width"] == 32
    loaded = FusionHead.load(tmp_path / "fusion")
    assert np.array_equal(loaded.predict_proba(Xte), expected)
    assert loaded.get_params() == fitted_fusion.get_params()
    assert loaded.history_ == fitted_fusion.history_
    assert loaded.n_params_ == fitted_fusion.n_params_
    blobs = fitted_fusion.to_bytes()
    assert sorted(blobs) == ["head.json", "head.safetensors"]
    assert blobs == fitted_fusion.to_bytes()  # deterministic bytes, fit for content addressing
    assert np.array_equal(FusionHead.from_bytes(blobs).predict_proba(Xte), expected)


def test_concat_roundtrip_is_identical(tmp_path, xor_data):
    (Xtr, ytr), (Xdv, ydv), (Xte, _) = xor_data
    head = ConcatHead(Cs=(0.1, 1.0)).fit(Xtr, ytr, Xdv, ydv)
    expected = head.predict_proba(Xte)
    head.save(tmp_path / "concat")
    meta = _assert_safe_files(tmp_path / "concat")
    assert meta["format"] == "concat-head"
    loaded = ConcatHead.load(tmp_path / "concat")
    assert np.array_equal(loaded.predict_proba(Xte), expected)
    assert loaded.get_params() == head.get_params()
    assert np.array_equal(ConcatHead.from_bytes(head.to_bytes()).predict_proba(Xte), expected)


def test_loading_the_wrong_kind_of_head_fails(xor_data, fitted_fusion):
    with pytest.raises(ValueError, match="not a concat-head v1 head: format='fusion-head'"):
        ConcatHead.from_bytes(fitted_fusion.to_bytes())
    with pytest.raises(ValueError, match=r"head bytes lack \['head.json'\]"):
        FusionHead.from_bytes({"head.safetensors": b""})
