"""The Makefile: every target it declares exists, and paths with spaces survive its recipes."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _dry(*args: str) -> list[list[str]]:
    proc = subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def test_every_declared_and_listed_target_is_defined():
    phony = set(re.search(r"^\.PHONY:(.*)$", MAKEFILE, re.M)[1].split())
    defined = set(re.findall(r"^([A-Za-z][\w-]*):", MAKEFILE, re.M))
    assert phony <= defined, phony - defined
    listed = set(re.findall(r'@echo "make ([a-z][\w-]*(?: [a-z][\w-]*)*)', MAKEFILE))
    for words in listed:
        assert set(words.split()) <= defined, words


@pytest.mark.parametrize("target", ["extract", "score", "train", "run", "predict", "store-ls", "store-verify"])
def test_paths_with_spaces_stay_one_argument(target, tmp_path):
    store, config, out = str(tmp_path / "my store"), str(tmp_path / "my config.toml"), str(tmp_path / "my reports")
    (argv,) = _dry(target, f"STORE={store}", f"CONFIG={config}", f"OUT={out}")
    assert argv[argv.index("--store") + 1] == store
    if "--config" in argv:
        assert argv[argv.index("--config") + 1] == config
    if "--out" in argv:
        assert argv[argv.index("--out") + 1] == out


def test_clean_reports_removes_out_and_refuses_the_root(tmp_path):
    out = tmp_path / "my reports"
    out.mkdir()
    (out / "report.md").write_text("x")
    assert subprocess.run(["make", "clean-reports", f"OUT={out}"], cwd=ROOT, capture_output=True, timeout=60).returncode == 0
    assert not out.exists()
    refused = subprocess.run(["make", "clean-reports", "OUT=/"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "refusing" in refused.stderr
