"""Fixtures of the project-spine tests: one config factory and one data-file writer.

The suite is offline: HF_HUB_OFFLINE is set before anything imports huggingface_hub.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pipeline_helpers import DEV_ROWS, TEST_ROWS, TRAIN_ROWS, base_config, write_rows  # noqa: E402


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder with train/dev/test TSV splits of two classes."""
    folder = tmp_path / "data"
    for split, rows in (("train", TRAIN_ROWS), ("dev", DEV_ROWS), ("test", TEST_ROWS)):
        write_rows(folder / f"{split}.tsv", rows)
    return folder


@pytest.fixture
def make_config(config_file, data_dir: Path) -> Callable[..., Path]:
    """make_config(**{'extract.max_length': 8}) -> path of a TOML file (base config plus overrides).

    ``raw=`` appends raw TOML text (for malformed files); ``filename=`` picks the file name.
    """

    def factory(overrides: dict | None = None, *, raw: str = "", filename: str | None = None, **kw) -> Path:
        return config_file(base_config(str(data_dir)), {**(overrides or {}), **kw}, filename=filename, raw=raw)

    return factory
