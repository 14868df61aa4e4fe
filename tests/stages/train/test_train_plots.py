"""plot_layers writes a figure without touching pyplot state."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from stages.train.plots import plot_layers


def test_plot_layers_one_panel_per_model(tmp_path):
    df = pd.DataFrame(
        {
            "model": ["bert"] * 4 + ["llama"] * 3,
            "layer": [0, 1, 2, 3, 0, 1, 2],
            "test_accuracy": [0.5, 0.7, 0.8, 0.75, 0.6, 0.9, 0.85],
            "nu": [np.inf, 2.0, 1.2, 1.5, 3.0, 0.8, np.nan],
        }
    )
    out = plot_layers(df, tmp_path / "plots" / "layers.png", title="probe vs nu")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["layers.png"]  # no temp file left


def test_plot_layers_without_model_or_nu(tmp_path):
    df = pd.DataFrame({"layer": [0, 1], "test_accuracy": [0.4, 0.6]})
    assert plot_layers(df, tmp_path / "l.svg").read_text().lstrip().startswith("<?xml")
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []


def test_plot_layers_needs_columns(tmp_path):
    with pytest.raises(ValueError, match=r"plot_layers: df lacks column\(s\) \['test_accuracy'\]"):
        plot_layers(pd.DataFrame({"layer": [0]}), tmp_path / "x.png")


def test_layers_figure_marks_chance_and_chosen_layers():
    from stages.train.plots import layers_figure

    df = pd.DataFrame(
        {
            "model": ["bert"] * 4,
            "layer": [0, 1, 2, 3],
            "test_accuracy": [0.5, 0.7, 0.8, 0.75],
            "dev_accuracy": [0.5, 0.8, 0.7, 0.7],
            "nu": [3.0, 1.0, 1.2, 1.5],
        }
    )
    fig = layers_figure(df, title="sst2: probes", chance=0.52, marks={"bert": {"lowest nu": 1, "best on dev": 1}})
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "chance 0.52" in labels and "lowest nu: 1" in labels and "best on dev: 1" in labels and "dev accuracy" in labels
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert fig._suptitle.get_text() == "sst2: probes"
