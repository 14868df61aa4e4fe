"""One declarative table of hyper-parameter constraints per estimator.

Each head lists ``{name: Constraint}`` once; :func:`validate_params` checks
them all at ``fit`` time (scikit-learn's habit: ``__init__`` only stores) and
every error names the parameter, its value and what is allowed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Constraint", "integer", "real", "real_sequence", "validate_params"]


@dataclass(frozen=True)
class Constraint:
    """A predicate on a parameter value and the words that describe what it allows."""

    check: Callable[[object], bool]
    allowed: str


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


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
        if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
            return False
        items = list(v)
        return bool(items) and all(_is_real(x) and (x > low if low_open else x >= low) for x in items)

    return Constraint(check, f"a non-empty sequence of finite reals {'>' if low_open else '>='} {low}")


def validate_params(owner: str, params: Mapping[str, object], table: Mapping[str, Constraint]) -> None:
    """Raise ``ValueError`` for the first parameter that breaks its constraint."""
    for name, constraint in table.items():
        value = params[name]
        if not constraint.check(value):
            raise ValueError(f"{owner}: parameter {name}={value!r} is invalid; expected {constraint.allowed}")
