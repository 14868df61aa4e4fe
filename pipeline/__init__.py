"""Configuration, CLI and orchestration shared by the extract, score and train stages.

``load_features`` and ``load_head`` (the notebook API, ``pipeline.api``) are imported on first
use (PEP 562), so ``import pipeline.config`` does not pull in the stages, torch or Dask.
"""

import importlib

from pipeline.version import __version__

_LAZY = {"load_features": "pipeline.api", "load_head": "pipeline.api"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "load_features", "load_head"]
