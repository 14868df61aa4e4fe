"""Suite-wide fixtures and options."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--crash-seeds", type=int, default=None, help="random SIGKILL seeds of the crash harness (default 6, or $CRASH_SEEDS)")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run several times faster on one thread than on two contended cores,
    and results are reproducible for a fixed thread count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
