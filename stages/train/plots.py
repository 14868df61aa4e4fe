"""Probe accuracy and variability ``nu`` per layer, one panel per model.

The figure is the visual form of the layer-selection claim: where ``nu`` dips,
accuracy should peak. Built with the object-oriented Figure API on the Agg
canvas so that no pyplot global state is touched (safe in workers and tests).
"""

from __future__ import annotations

import os
import tempfile
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_layers"]


def plot_layers(df: pd.DataFrame, path: str | PathLike, *, title: str | None = None) -> Path:
    """Plot test accuracy (left axis) and ``nu`` (right axis, log scale) against layer.

    Parameters
    ----------
    df : pandas.DataFrame
        Columns ``layer`` and ``test_accuracy`` are required; ``nu`` is drawn when
        present (non-finite and non-positive values are left out of the log axis and
        marked at the top of the panel as ``nu=inf``); ``model`` gives one panel per model
        (a single panel when absent).
    path : str or path-like
        Output file; the format follows its suffix (``.png``, ``.pdf``, ``.svg``).
    title : str, optional
        Figure title.

    Returns
    -------
    pathlib.Path
        ``path``, written atomically.
    """
    missing = [c for c in ("layer", "test_accuracy") if c not in df.columns]
    if missing:
        raise ValueError(f"plot_layers: df lacks column(s) {missing}; has {list(df.columns)}")
    if df.empty:
        raise ValueError("plot_layers: df has no rows")
    groups = list(df.groupby("model", sort=True)) if "model" in df.columns else [(None, df)]

    fig = Figure(figsize=(5.0 * len(groups), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (model, part) in zip(axes, groups):
        part = part.sort_values("layer")
        layers = part["layer"].to_numpy()
        ax.plot(layers, part["test_accuracy"].to_numpy(), "o-", color="C0", label="probe test accuracy")
        ax.set_xlabel("layer")
        ax.set_ylabel("test accuracy", color="C0")
        ax.tick_params(axis="y", labelcolor="C0")
        ax.set_title(str(model) if model is not None else "probe per layer")
        if "nu" in part.columns:
            nu = part["nu"].to_numpy(dtype=float)
            ok = np.isfinite(nu) & (nu > 0)
            ax2 = ax.twinx()
            if ok.any():
                ax2.semilogy(layers[ok], nu[ok], "s--", color="C3", label="nu")
            else:
                ax2.set_yscale("log")
            for layer in layers[np.isposinf(nu)]:
                ax2.annotate("nu=inf", (layer, 1.0), xycoords=("data", "axes fraction"),
                             ha="center", va="top", color="C3", fontsize=8)
            ax2.set_ylabel("nu (log)", color="C3")
            ax2.tick_params(axis="y", labelcolor="C3")
    if title:
        fig.suptitle(title)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
