"""Configuration, CLI and orchestration shared by the extract, score and train stages."""

from pipeline.version import __version__

__all__ = ["__version__"]
