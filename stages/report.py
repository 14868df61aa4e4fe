"""report.md: Markdown tables and the per-stage sections that score and train write into one file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.outputs import write_atomic


def md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "inf" if np.isinf(v) else f"{v:.4g}"
    return str(v)


TRAIN_MARKER = "## Train: heads on cached features"


def write_section(path: Path, title: str, marker: str, section: str) -> None:
    """Replace the part of report.md from ``marker`` on with ``section``; a new file starts with ``title``."""
    text = path.read_text(encoding="utf-8") if path.exists() else f"# {title}\n\n"
    text = text.split(marker)[0].rstrip() + "\n\n"
    write_atomic(path, text + section)


def write_score_part(path: Path, text: str) -> None:
    """Replace what score owns (everything before the train section) with ``text``, so a re-run of
    score keeps the train section that a train run wrote."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    train = old[old.index(TRAIN_MARKER) :] if TRAIN_MARKER in old else ""
    write_atomic(path, text.rstrip() + "\n\n" + train if train else text)
