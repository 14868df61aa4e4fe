"""Validation of named feature blocks, shared by the multi-block heads.

Heads take their inputs as ``{name: (n_samples, n_features)}`` so that a
caller cannot silently swap two blocks of the same width; every check here
names the block it rejects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["check_blocks", "check_labels", "check_against_fitted", "check_names"]


def check_blocks(inputs: Mapping[str, np.ndarray], *, owner: str, what: str = "inputs", dtype=np.float32) -> dict[str, np.ndarray]:
    """Return the blocks as finite 2-D arrays of ``dtype`` with one shared row count.

    Parameters
    ----------
    inputs : mapping of str to array-like of shape (n_samples, n_features)
        Named feature blocks.
    owner : str
        Class name used in error messages.
    what : str
        Argument name used in error messages.
    dtype : numpy dtype
        Dtype of the returned arrays (float32 for torch heads, float64 for sklearn ones).

    Returns
    -------
    dict of str to ndarray
        The same blocks, keyed in sorted name order, as C-contiguous ``dtype``.
    """
    if not isinstance(inputs, Mapping) or not inputs:
        raise ValueError(f"{owner}: {what} must be a non-empty mapping of block name to a 2-D array, got {type(inputs).__name__}")
    out: dict[str, np.ndarray] = {}
    n_rows = None
    for name in sorted(inputs):
        if not isinstance(name, str) or not name:
            raise ValueError(f"{owner}: block names must be non-empty strings, got {name!r}")
        block = np.ascontiguousarray(inputs[name], dtype=dtype)
        if block.ndim != 2 or block.shape[1] == 0:
            raise ValueError(
                f"{owner}: block {name!r} in {what} must be 2-D (n_samples, n_features) with n_features >= 1, got shape {block.shape}"
            )
        if not np.isfinite(block).all():
            raise ValueError(f"{owner}: block {name!r} in {what} contains NaN or infinity")
        if n_rows is None:
            n_rows = block.shape[0]
        elif block.shape[0] != n_rows:
            raise ValueError(f"{owner}: block {name!r} in {what} has {block.shape[0]} rows, but the other blocks have {n_rows}")
        out[name] = block
    if n_rows == 0:
        raise ValueError(f"{owner}: {what} has no rows")
    return out


def check_labels(y, n_rows: int, *, owner: str, what: str) -> np.ndarray:
    """Return ``y`` as a 1-D array of length ``n_rows``."""
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n_rows:
        raise ValueError(f"{owner}: {what} must be 1-D with {n_rows} labels (one per row), got shape {y.shape}")
    return y


def check_against_fitted(blocks: Mapping[str, np.ndarray], dims: Mapping[str, int], *, owner: str) -> None:
    """Raise ``ValueError`` naming any block that is missing, unexpected or of the wrong width."""
    missing = sorted(set(dims) - set(blocks))
    extra = sorted(set(blocks) - set(dims))
    if missing:
        raise ValueError(f"{owner}: missing input block(s) {missing}; fitted with {sorted(dims)}")
    if extra:
        raise ValueError(f"{owner}: unexpected input block(s) {extra}; fitted with {sorted(dims)}")
    for name, width in dims.items():
        got = blocks[name].shape[1]
        if got != width:
            raise ValueError(f"{owner}: block {name!r} has {got} features, but {owner} was fitted with {width} features for it")


def check_names(names: Sequence[str], known: Sequence[str], *, owner: str, what: str) -> list[str]:
    """Return ``names`` as a list after checking each is one of ``known``."""
    if isinstance(names, str):
        raise ValueError(f"{owner}: {what} must be a sequence of block names, not a string")
    names = list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{owner}: {what} names unknown block(s) {unknown}; blocks are {sorted(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{owner}: {what} repeats a block name: {names}")
    return names
