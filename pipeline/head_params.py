"""The heads' hyper-parameters: one table of constraints and one set of defaults.

The config validates ``train`` and its ``fusion``/``llmembed`` tables with these constraints
when it loads, and the heads (``stages/train``) check the very same ones at ``fit`` and take
their constructor defaults from here: a bad value fails before extract runs instead of after
it, and the config and a head built by hand can never disagree. Each error names the
parameter, its value and what is allowed (scikit-learn's ``_parameter_constraints`` habit).
No torch here: the config must stay cheap to import.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = [
    "Constraint",
    "integer",
    "real",
    "real_sequence",
    "int_sequence",
    "boolean",
    "validate_params",
    "DEFAULT_CS",
    "CS",
    "FusionDefaults",
    "LLMEmbedDefaults",
    "FUSION",
    "LLMEMBED",
    "FUSION_CONSTRAINTS",
    "LLMEMBED_CONSTRAINTS",
    "FIT_CONSTRAINTS",
]


@dataclass(frozen=True)
class Constraint:
    """A predicate on a parameter value and the words that describe what it allows."""

    check: Callable[[object], bool]
    allowed: str


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_sequence(v) -> bool:
    return not isinstance(v, (str, bytes)) and hasattr(v, "__iter__")


def integer(low: int) -> Constraint:
    """An int ``>= low``."""
    return Constraint(lambda v: _is_int(v) and v >= low, f"an int >= {low}")


def real(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = True) -> Constraint:
    """A finite real in the given interval (``high=None``: unbounded above)."""
    lo = "(" if low_open else "["
    hi = ")" if high_open or high is None else "]"
    text = f"a finite real in {lo}{low}, {'inf' if high is None else high}{hi}"

    def check(v) -> bool:
        if not _is_real(v):
            return False
        if v < low or (low_open and v == low):
            return False
        if high is not None and (v > high or (high_open and v == high)):
            return False
        return True

    return Constraint(check, text)


def real_sequence(low: float, *, low_open: bool = True) -> Constraint:
    """A non-empty sequence of finite reals above ``low``."""

    def check(v) -> bool:
        if not _is_sequence(v):
            return False
        items = list(v)
        return bool(items) and all(_is_real(x) and (x > low if low_open else x >= low) for x in items)

    return Constraint(check, f"a non-empty sequence of finite reals {'>' if low_open else '>='} {low}")


def int_sequence(low: int) -> Constraint:
    """A non-empty sequence of ints ``>= low``."""

    def check(v) -> bool:
        return _is_sequence(v) and len(list(v)) > 0 and all(_is_int(x) and x >= low for x in v)

    return Constraint(check, f"a non-empty sequence of ints >= {low}")


def boolean() -> Constraint:
    """``True`` or ``False``."""
    return Constraint(lambda v: isinstance(v, bool), "True or False")


def validate_params(owner: str, params: Mapping[str, object], table: Mapping[str, Constraint]) -> None:
    """Raise ``ValueError`` for the first parameter that breaks its constraint."""
    for name, constraint in table.items():
        value = params[name]
        if not constraint.check(value):
            raise ValueError(f"{owner}: parameter {name}={value!r} is invalid; expected {constraint.allowed}")


# --- logistic probes and the concat head ------------------------------------------------------

DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
"""Inverse regularisation strengths a probe tries (``train.Cs``); the one best on dev is kept."""
CS = real_sequence(0.0)

# --- fused heads --------------------------------------------------------------------------------

_DROPOUT = real(0.0, 0.95, high_open=False)  # at 1.0 nothing passes; above 0.95 the head learns next to nothing


@dataclass(frozen=True)
class FusionDefaults:
    """Defaults of ``train.fusion`` and of :class:`stages.train.fusion.FusionHead`."""

    width: int = 256
    sigma: float = 0.01  # about 1/width: dot products of width-256 projections saturate sigmoid(1 * P)
    hidden: int = 256
    dropout: float = 0.1
    epochs: int = 40
    patience: int = 5
    lr: float = 1e-3
    batch_size: int = 64


@dataclass(frozen=True)
class LLMEmbedDefaults:
    """Defaults of ``train.llmembed`` and of :class:`stages.train.llmembed.LLMEmbedHead` (the reference's values)."""

    width: int = 0  # 0 = the widest non-llama block
    sigma: float = 0.01
    hidden: tuple[int, ...] = (1024, 256)
    dropout: float = 0.5
    epochs: int = 300
    patience: int = 30
    lr: float = 1e-4
    batch_size: int = 1024


FUSION = FusionDefaults()
LLMEMBED = LLMEmbedDefaults()

FUSION_CONSTRAINTS: dict[str, Constraint] = {
    "width": integer(1),
    "sigma": real(0.0, low_open=True),
    "hidden": integer(1),
    "dropout": _DROPOUT,
    "epochs": integer(1),
    "patience": integer(1),
    "lr": real(0.0, low_open=True),
    "batch_size": integer(1),
}
LLMEMBED_CONSTRAINTS: dict[str, Constraint] = {
    **FUSION_CONSTRAINTS,
    "width": integer(0),
    "hidden": int_sequence(1),
}
FIT_CONSTRAINTS: dict[str, Constraint] = {
    "weight_decay": real(0.0),
    "seed": integer(0),
}
"""What a head takes that the config does not set (or sets elsewhere: ``seed``)."""
