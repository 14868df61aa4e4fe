"""The code version recorded in every manifest (`store ls` shows it): package version + git commit."""

from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__version__ = "0.1.0"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """'layerstore 0.1.0+g<commit>[.dirty]' from a git checkout, else 'layerstore <version>'."""
    try:
        v = version("layerstore")
    except PackageNotFoundError:
        v = __version__
    commit = _git_commit(Path(__file__).resolve().parent.parent)
    return f"layerstore {v}" + (f"+g{commit}" if commit else "")


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty=.dirty", "--abbrev=12", "--exclude", "*"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return text if out.returncode == 0 and text else None
