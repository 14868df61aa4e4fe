"""Configuration, CLI and orchestration shared by the extract, score and train stages."""

__version__ = "0.1.0"
