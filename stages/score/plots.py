"""Plots of the score tables against relative depth.

Relative depth puts models of different depth on one axis. A
``relative_depth`` column is used as given; otherwise it is
``layer / n_layers``, with n_layers taken from an ``n_layers`` column or
inferred per model: for hidden states (layer 0 = embeddings) the largest
layer index, for FFN layers (0-based blocks) the largest index + 1.
When the table holds several datasets or splits, each gets its own line
(and marker). Figures are
built as ``matplotlib.figure.Figure`` objects on the Agg canvas, so no
pyplot global state is touched.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")
_GROUPS = ("dataset", "split")


def plot_variability(df: pd.DataFrame, path) -> Path:
    """nu vs relative depth, one colour per model, one line style per pooling.

    Expects columns model, layer, nu and optionally pooling, n_layers,
    relative_depth, dataset, split. Infinite, NaN and non-positive nu are
    left out (log y axis).
    """
    data = _with_depth(df, offset=0)
    data = data[np.isfinite(data["nu"]) & (data["nu"] > 0)]
    if "pooling" not in data:
        data = data.assign(pooling="")
    fig = _figure(1)
    ax = fig.axes[0]
    styles = dict(zip(sorted(data["pooling"].unique()),
                      itertools.cycle(_LINESTYLES)))
    for (group, model, pooling), part in _lines(data, ["model", "pooling"]):
        part = part.sort_values("depth")
        label = " / ".join(str(v) for v in (*group, model, pooling) if v != "")
        ax.plot(part["depth"], part["nu"], marker=_marker(data, group),
                markersize=3, linestyle=styles[pooling],
                color=_colour(data, model), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("relative depth")
    ax.set_ylabel("variability nu (lower separates better)")
    _finish(ax)
    return _save(fig, path)


def plot_sparsity(df: pd.DataFrame, path) -> Path:
    """Token fire fraction and dead-neuron fraction vs relative depth.

    Expects the per-layer sparsity table with a model column (and
    optionally n_layers, relative_depth, threshold, dataset, split); the
    threshold is shown in the legend.
    """
    data = _with_depth(df, offset=1)
    fig = _figure(2)
    panels = (("token_fire_fraction", "token fire fraction"),
              ("dead_fraction", "dead neuron fraction"))
    for ax, (column, title) in zip(fig.axes, panels):
        for (group, model), part in _lines(data, ["model"]):
            part = part.sort_values("depth")
            label = " / ".join(str(v) for v in (*group, model))
            if "threshold" in part:
                label += f" (thr {part['threshold'].iloc[0]:g})"
            ax.plot(part["depth"], part[column], marker=_marker(data, group),
                    markersize=3, color=_colour(data, model), label=label)
        ax.set_xlabel("relative depth")
        ax.set_ylabel(title)
        ax.set_ylim(-0.02, 1.02)
        _finish(ax)
    return _save(fig, path)


def _with_depth(df: pd.DataFrame, offset: int) -> pd.DataFrame:
    """Add a ``depth`` column; infer n_layers per model when absent."""
    data = df.copy()
    if "relative_depth" in data:
        data["depth"] = data["relative_depth"]
        return data
    if "n_layers" not in data:
        data["n_layers"] = data.groupby("model")["layer"].transform("max") + offset
    data["depth"] = data["layer"] / data["n_layers"].clip(lower=1)
    return data


def _lines(data: pd.DataFrame, keys: list[str]):
    """Yield ((dataset, split values), *keys) and rows, one per plotted line."""
    extra = [c for c in _GROUPS if c in data]
    for values, part in data.groupby(extra + keys, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        yield (tuple(values[:len(extra)]), *values[len(extra):]), part


def _marker(data: pd.DataFrame, group: tuple) -> str:
    """Stable marker per (dataset, split) group."""
    extra = [c for c in _GROUPS if c in data]
    groups = sorted(set(map(tuple, data[extra].astype(str).to_numpy()))) \
        if extra else [()]
    key = tuple(str(v) for v in group)
    return _MARKERS[groups.index(key) % len(_MARKERS)] if key in groups else "o"


def _colour(data: pd.DataFrame, model) -> str:
    """Stable colour per model, from the sorted list of models."""
    models = sorted(data["model"].unique())
    return f"C{models.index(model) % 10}"


def _figure(n_panels: int) -> Figure:
    """A Figure on its own Agg canvas."""
    fig = Figure(figsize=(5.5 * n_panels, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    fig.subplots(1, n_panels, squeeze=False)
    return fig


def _finish(ax) -> None:
    """Grid and a legend only when something was drawn."""
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _save(fig: Figure, path) -> Path:
    """Write the figure, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
