"""Probe accuracy and variability ``nu`` per layer, one panel per model.

The figure is the visual form of the layer-selection claim: where ``nu`` dips,
accuracy should peak. Built with the object-oriented Figure API on the Agg
canvas so that no pyplot global state is touched (safe in workers and tests).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.outputs import save_figure

__all__ = ["plot_layers", "layers_figure"]


def plot_layers(
    df: pd.DataFrame, path: str | PathLike, *, title: str | None = None, chance: float | None = None, marks: dict | None = None
) -> Path:
    """Plot dev and test accuracy (left axis) and ``nu`` (right axis, log scale) against layer.

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
        Figure title (say dataset and splits).
    chance : float, optional
        Accuracy of always predicting the majority class, drawn as a grey line.
    marks : dict, optional
        model -> {label: layer}: chosen layers (e.g. lowest nu, best on dev) drawn as vertical lines.

    Returns
    -------
    pathlib.Path
        ``path``, written atomically.
    """
    return save_figure(layers_figure(df, title=title, chance=chance, marks=marks), path)


def layers_figure(df: pd.DataFrame, *, title: str | None = None, chance: float | None = None, marks: dict | None = None) -> Figure:
    """The figure ``plot_layers`` writes."""
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
        ax.plot(layers, part["test_accuracy"].to_numpy(), "o-", color="C0", label="test accuracy")
        if "dev_accuracy" in part.columns:
            ax.plot(layers, part["dev_accuracy"].to_numpy(), "o:", color="C0", alpha=0.6, markersize=3, label="dev accuracy")
        if chance is not None and np.isfinite(chance):
            ax.axhline(chance, color="0.5", linestyle="--", linewidth=1, label=f"chance {chance:.2f}")
        for i, (label, layer) in enumerate(((marks or {}).get(model) or {}).items()):
            if layer is not None and layer >= 0:
                ax.axvline(layer, color=f"C{2 + i}", linestyle="-." if i else "-", linewidth=1.2, alpha=0.8, label=f"{label}: {layer}")
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel("accuracy", color="C0")
        ax.tick_params(axis="y", labelcolor="C0")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="x-small", loc="lower right")
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
                ax2.annotate("nu=inf", (layer, 1.0), xycoords=("data", "axes fraction"), ha="center", va="top", color="C3", fontsize=8)
            ax2.set_ylabel("nu (log)", color="C3")
            ax2.tick_params(axis="y", labelcolor="C3")
    if title:
        fig.suptitle(title)
    return fig
