"""Suite-wide fixtures and options."""

from __future__ import annotations

import itertools
import os

import pytest
from config_factory import write_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--crash-seeds", type=int, default=None, help="random SIGKILL seeds of the crash harness (default 6, or $CRASH_SEEDS)")


@pytest.fixture
def config_file(tmp_path):
    """``config_file(data, overrides=None, *, filename=None, raw="")`` -> a TOML config written in ``tmp_path``.

    ``data`` is a config dict (see tests/config_factory.py), ``overrides`` dotted keys set on a copy of it.
    """
    counter = itertools.count()

    def make(data: dict, overrides: dict | None = None, *, filename: str | None = None, raw: str = ""):
        return write_config(tmp_path / (filename or f"config{next(counter)}.toml"), data, overrides, raw=raw)

    return make


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run several times faster on one thread than on two contended cores,
    and results are reproducible for a fixed thread count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
