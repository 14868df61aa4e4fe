"""Small-multiple plots of the score tables: one panel per model, layers on integer ticks.

Each panel plots one model against its own layer indices (hidden state i = output of block i,
0 = embeddings; FFN activations of block i are drawn at i too), so models of different depth
do not share a squeezed axis. The variability plot marks the selected (lowest-nu) layer and
shows an infinite nu as a labelled marker at the top of the panel rather than dropping it. When
the table holds several datasets or splits, each gets its own line style. Figures are built as
``matplotlib.figure.Figure`` objects on the Agg canvas, so no pyplot global state is touched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.outputs import save_figure

_LINESTYLES = ("-", "--", ":", "-.")
_GROUPS = ("dataset", "split")


def plot_variability(df: pd.DataFrame, path, *, title: str | None = None) -> Path:
    """nu per layer, one panel per model, one colour per pooling; writes ``path``.

    Expects columns model, layer, nu and optionally pooling, lowest (the selected layer),
    random_init, dataset, split. Infinite nu is drawn as a triangle at the top of the panel
    labelled "inf"; NaN and non-positive nu are left out (log y axis).
    """
    return _save(variability_figure(df, title=title), path)


def variability_figure(df: pd.DataFrame, *, title: str | None = None) -> Figure:
    data = df.copy()
    if "pooling" not in data:
        data = data.assign(pooling="")
    models = list(dict.fromkeys(data["model"]))
    fig, axes = _panels(1, len(models))
    poolings = sorted(data["pooling"].unique())
    colours = {p: f"C{i % 10}" for i, p in enumerate(poolings)}
    for ax, model in zip(axes[0], models):
        part_m = data[data["model"] == model]
        for (group, pooling), part in _lines(part_m, ["pooling"]):
            part = part.sort_values("layer")
            nu = part["nu"].to_numpy(dtype=float)
            layers = part["layer"].to_numpy()
            ok = np.isfinite(nu) & (nu > 0)
            label = " / ".join(str(v) for v in (*group, pooling) if v != "") or "nu"
            ax.plot(layers[ok], nu[ok], marker="o", markersize=3, color=colours[pooling], linestyle=_style(data, group), label=label)
            for layer in layers[np.isposinf(nu)]:
                ax.plot([layer], [0.97], marker="^", color=colours[pooling], transform=ax.get_xaxis_transform(), clip_on=False)
                ax.annotate(
                    "inf",
                    (layer, 0.97),
                    xycoords=("data", "axes fraction"),
                    xytext=(0, -10),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                    color=colours[pooling],
                )
            if "lowest" in part:
                sel = part[part["lowest"].astype(bool) & np.isfinite(part["nu"])]
                ax.plot(
                    sel["layer"],
                    sel["nu"],
                    marker="*",
                    markersize=13,
                    linestyle="none",
                    markerfacecolor="none",
                    markeredgecolor=colours[pooling],
                    markeredgewidth=1.3,
                    label="selected (lowest nu)" if pooling == poolings[0] else None,
                )
        if (np.isfinite(part_m["nu"]) & (part_m["nu"] > 0)).any():
            ax.set_yscale("log")
        ax.set_title(_panel_title(part_m, model))
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_ylabel("nu (log; lower separates better)")
        _integer_ticks(ax)
        ax.grid(True, alpha=0.3)
    _legend(fig, axes)
    if title:
        fig.suptitle(title)
    return fig


def plot_sparsity(df: pd.DataFrame, path, *, title: str | None = None) -> Path:
    """Token fire fraction (top row) and dead-neuron fraction (bottom row) per FFN layer, one
    column per model, one line per threshold; writes ``path``."""
    return _save(sparsity_figure(df, title=title), path)


def sparsity_figure(df: pd.DataFrame, *, title: str | None = None) -> Figure:
    data = df.copy()
    if "threshold" not in data:
        data = data.assign(threshold=np.nan)
    data["block"] = data["layer"] + 1  # FFN of block i sits at hidden-state index i
    models = list(dict.fromkeys(data["model"]))
    fig, axes = _panels(2, len(models))
    panels = (("token_fire_fraction", "token fire fraction"), ("dead_fraction", "dead neuron fraction"))
    for col, model in enumerate(models):
        part_m = data[data["model"] == model]
        rule = part_m["rule"].iloc[0] if "rule" in part_m else "gt"
        sign = "|a|" if rule == "abs_gt" else "a"
        thresholds = list(dict.fromkeys(part_m["threshold"]))
        for row, (column, name) in enumerate(panels):
            ax = axes[row][col]
            for i, t in enumerate(thresholds):
                for group, part in _lines(part_m[(part_m["threshold"] == t) | (pd.isna(t) & part_m["threshold"].isna())], []):
                    part = part.sort_values("block")
                    label = " / ".join([*map(str, group), f"{sign} > {t:g}" if not pd.isna(t) else "fires"])
                    ax.plot(
                        part["block"],
                        part[column],
                        marker="o",
                        markersize=3,
                        color=f"C{i % 10}",
                        linestyle=_style(data, group),
                        label=label,
                    )
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("FFN of block")
            ax.set_ylabel(name)
            if row == 0:
                ax.set_title(_panel_title(part_m, model))
            _integer_ticks(ax)
            ax.grid(True, alpha=0.3)
            if row == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="x-small", title="fires when", title_fontsize="x-small")
    if title:
        fig.suptitle(title)
    return fig


def _panel_title(part: pd.DataFrame, model) -> str:
    random = "random_init" in part and bool(part["random_init"].any())
    return f"{model} (random weights)" if random else str(model)


def _panels(rows: int, cols: int):
    cols = max(cols, 1)
    fig = Figure(figsize=(min(4.2 * cols, 18.0), 3.4 * rows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _integer_ticks(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _lines(data: pd.DataFrame, keys: list[str]):
    """Yield (((dataset, split) values, *keys), rows), one per plotted line."""
    extra = [c for c in _GROUPS if c in data]
    if not extra and not keys:
        yield (), data
        return
    for values, part in data.groupby(extra + keys, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        group = tuple(values[: len(extra)])
        yield ((group, *values[len(extra) :]) if keys else group), part


def _style(data: pd.DataFrame, group: tuple) -> str:
    """Stable line style per (dataset, split) group."""
    extra = [c for c in _GROUPS if c in data]
    groups = sorted(set(map(tuple, data[extra].astype(str).to_numpy()))) if extra else [()]
    key = tuple(str(v) for v in group)
    return _LINESTYLES[groups.index(key) % len(_LINESTYLES)] if key in groups else "-"


def _legend(fig: Figure, axes) -> None:
    """One legend for the figure, below the panels, so it never covers data."""
    seen: dict[str, object] = {}
    for ax in np.ravel(axes):
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=min(len(seen), 6), fontsize="small")


def _save(fig: Figure, path) -> Path:
    return save_figure(fig, path, dpi=110)


__all__ = ["plot_variability", "plot_sparsity", "variability_figure", "sparsity_figure"]
