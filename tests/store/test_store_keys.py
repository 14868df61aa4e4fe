"""Fingerprints: equal descriptions share a key, any change makes a new one, unhashable input raises."""

from __future__ import annotations

import numpy as np
import pytest

from store import fingerprint
from store.keys import canonical_json, validate_key, validate_name


def _leaf_paths(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaf_paths(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix


def test_same_description_same_key(description):
    assert fingerprint(description()) == fingerprint(description())
    assert len(fingerprint(description())) == 64


def test_every_single_field_change_gives_new_key(description):
    base = description()
    keys = {fingerprint(base)}
    for path in _leaf_paths(base):
        node = base
        for part in path.split("."):
            node = node[part]
        changed = description(**{path: [node, "x"] if isinstance(node, list) else f"{node}-changed"})
        keys.add(fingerprint(changed))
    assert len(keys) == 1 + len(list(_leaf_paths(base)))


def test_key_order_does_not_matter():
    a = {"model": {"name": "bert", "revision": "r1"}, "layers": [0, 1], "x": 1.5}
    b = {"x": 1.5, "layers": [0, 1], "model": {"revision": "r1", "name": "bert"}}
    assert fingerprint(a) == fingerprint(b)


def test_list_order_matters():
    assert fingerprint({"layers": [0, 1]}) != fingerprint({"layers": [1, 0]})


def test_numpy_scalars_equal_python_values():
    assert fingerprint({"n": np.int64(3), "f": np.float64(0.25), "b": np.bool_(True)}) == fingerprint({"n": 3, "f": 0.25, "b": True})


def test_canonical_floats_and_types():
    assert canonical_json({"b": 0.1, "a": (1, None, True)}) == '{"a":[1,null,true],"b":0.1}'
    assert fingerprint({"x": 1}) != fingerprint({"x": 1.0})
    assert fingerprint({"x": "é"}) == fingerprint({"x": "\u00e9"})


@pytest.mark.parametrize("bad", [{1, 2}, object(), b"bytes", lambda: 0, np.arange(3), {1: "int key"}])
def test_unhashable_raises_type_error(bad):
    with pytest.raises(TypeError, match="cannot fingerprint"):
        fingerprint({"value": bad})


def test_non_finite_float_raises():
    with pytest.raises(ValueError, match="non-finite"):
        fingerprint({"x": float("nan")})


@pytest.mark.parametrize("key", ["", "abc", "g" * 20, "A" * 20, "a" * 65, "../" + "a" * 20, 12345678901234567890])
def test_invalid_keys_rejected(key):
    with pytest.raises(ValueError, match="invalid store key"):
        validate_key(key)


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs", "..hidden"])
def test_invalid_file_names_rejected(name):
    with pytest.raises(ValueError, match="invalid entry file name"):
        validate_name(name)
