"""Model resolution (offline), loading, and the per-family layer/FFN table."""

from pipeline.models.families import FAMILIES, Family, family_of
from pipeline.models.registry import EMBEDDED, ModelSpec, load, resolve

__all__ = ["EMBEDDED", "FAMILIES", "Family", "ModelSpec", "family_of", "load", "resolve"]
