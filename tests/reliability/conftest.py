"""Fixtures of the fault-injection suite (GitHub issue "Reliability").

Options (pass them with the folder, e.g. `pytest tests/reliability --crash-seeds=20`; from the project
root, where pytest does not load this conftest before parsing options, use `CRASH_SEEDS=20 pytest`):
  --crash-seeds=N   random SIGKILL seeds of the crash harness (default 6; the deterministic kill
                    points always run)
Tests marked `slow` repeat the CLI matrices through a fresh `python -m pipeline` interpreter per case
(the default runs them in forked children of one pre-imported interpreter: same `pipeline.cli.main`,
milliseconds instead of seconds of imports) and run the crash harness with real subprocesses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from config_factory import write_config
from reliability_helpers import Zygote, base_config, entry_dirs, store_digest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def crash_seeds(request) -> int:
    """--crash-seeds N (registered in tests/conftest.py) or $CRASH_SEEDS; default 6."""
    value = request.config.getoption("--crash-seeds", default=None)
    return int(value) if value is not None else int(os.environ.get("CRASH_SEEDS", "6"))


@pytest.fixture(scope="session")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@dataclass
class Reference:
    config: Path
    store: Path
    key: str
    digest: dict
    seconds: float  # wall time of an uninterrupted extract from its first store write to exit


@pytest.fixture(scope="session")
def reference(zygote, tmp_path_factory) -> Reference:
    """An uninterrupted extract of the base config: the bytes every crashed-and-resumed run must end at."""
    d = tmp_path_factory.mktemp("reference")
    cfg = write_config(d / "config.toml", base_config())
    res = zygote.run(["extract", "--config", str(cfg), "--store", str(d / "store"), "-q"], kill_after=float("inf"))
    assert res.code == 0, res.stderr
    seconds = res.work_seconds
    (key,) = entry_dirs(d / "store")
    return Reference(cfg, d / "store", key, store_digest(d / "store")[key], seconds)


@pytest.fixture
def cli(zygote):
    """Run `pipeline.cli.main(argv)` in a forked child; returns a Result (code, stdout, stderr)."""
    return lambda argv, **kw: zygote.run([str(a) for a in argv], **kw)
