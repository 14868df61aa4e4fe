"""Heads round-trip through safetensors + JSON with bit-identical probabilities, no pickle."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load as safe_load

from stages.entries.heads_format import entry_files, read_entry_head
from stages.train.fusion import ConcatHead, FusionHead
from stages.train.probes import fit_probe, probe_from_arrays, probe_from_bytes, probe_to_arrays, probe_to_bytes
from store import Store, fingerprint


def _through_store(tmp_path, stem: str, blobs: dict[str, bytes]) -> dict[str, bytes]:
    """Write a head into a heads entry and read it back, as train and predict do."""
    desc = {"kind": "heads", "dataset": {"name": "xor", "split": "heads"}, "model": {"name": stem}}
    writer = Store(str(tmp_path / "store")).writer(fingerprint(desc), desc, n_shards=0)
    files = entry_files(stem, blobs)
    assert sorted(files) == [f"{stem}.json", f"{stem}.safetensors"]
    for name, data in files.items():
        writer.write_file(name, data)
    return read_entry_head(writer.commit(), stem)


def _assert_safe_files(blobs: dict[str, bytes]) -> dict:
    """Exactly one safetensors blob and one JSON blob, neither a pickle; returns the JSON."""
    assert sorted(blobs) == ["head.json", "head.safetensors"]
    raw = blobs["head.safetensors"]
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert header and all("dtype" in v for k, v in header.items() if k != "__metadata__")
    assert sorted(safe_load(raw)) == sorted(k for k in header if k != "__metadata__")
    for blob in blobs.values():
        assert not blob.startswith(b"\x80")  # pickle protocol >= 2 opcode
    return json.loads(blobs["head.json"])


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
    blobs = _through_store(tmp_path, "probe-m-1-mean", probe_to_bytes(model))
    assert _assert_safe_files(blobs)["format"] == "linear-probe"
    loaded = probe_from_bytes(blobs)
    assert np.array_equal(loaded.predict_proba(X), expected)
    assert np.array_equal(loaded.predict(X), model.predict(X))


def test_fusion_roundtrip_is_identical(tmp_path, xor_data, fitted_fusion):
    _, _, (Xte, _) = xor_data
    expected = fitted_fusion.predict_proba(Xte)
    blobs = fitted_fusion.to_bytes()
    assert blobs == fitted_fusion.to_bytes()  # deterministic bytes, fit for content addressing
    stored = _through_store(tmp_path, "fusion", blobs)
    assert stored == blobs
    meta = _assert_safe_files(stored)
    assert meta["format"] == "fusion-head"
    assert meta["block_names"] == ["a", "b"] and meta["params"]["width"] == 32
    loaded = FusionHead.from_bytes(stored)
    assert np.array_equal(loaded.predict_proba(Xte), expected)
    assert loaded.get_params() == fitted_fusion.get_params()
    assert loaded.history_ == fitted_fusion.history_
    assert loaded.n_params_ == fitted_fusion.n_params_


def test_concat_roundtrip_is_identical(tmp_path, xor_data):
    (Xtr, ytr), (Xdv, ydv), (Xte, _) = xor_data
    head = ConcatHead(Cs=(0.1, 1.0)).fit(Xtr, ytr, Xdv, ydv)
    expected = head.predict_proba(Xte)
    stored = _through_store(tmp_path, "concat", head.to_bytes())
    assert _assert_safe_files(stored)["format"] == "concat-head"
    loaded = ConcatHead.from_bytes(stored)
    assert np.array_equal(loaded.predict_proba(Xte), expected)
    assert loaded.get_params() == head.get_params()


def test_loading_the_wrong_kind_of_head_fails(xor_data, fitted_fusion):
    with pytest.raises(ValueError, match="not a concat-head v1 head: format='fusion-head'"):
        ConcatHead.from_bytes(fitted_fusion.to_bytes())
    with pytest.raises(ValueError, match=r"head bytes lack \['head.json'\]"):
        FusionHead.from_bytes({"head.safetensors": b""})
