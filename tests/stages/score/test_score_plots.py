"""Plots write files and leave no pyplot state behind."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from stages.score.plots import plot_sparsity, plot_variability


def test_plot_variability(tmp_path):
    df = pd.DataFrame(
        {
            "model": ["bert"] * 4 + ["llama"] * 6,
            "pooling": ["mean", "mean", "first", "first"] + ["mean"] * 6,
            "layer": [0, 1, 0, 1, 0, 1, 2, 3, 4, 5],
            "nu": [np.inf, 1.5, 2.0, np.nan, np.inf, 3.0, 2.0, 1.0, 0.8, 0.0],
        }
    )
    out = plot_variability(df, tmp_path / "sub" / "nu.png")
    assert out.exists() and out.stat().st_size > 1000
    assert plt.get_fignums() == []


def test_plot_sparsity(tmp_path):
    df = pd.DataFrame(
        {
            "model": ["t5"] * 3 + ["bert"] * 2,
            "layer": [0, 1, 2, 0, 1],
            "n_layers": [3, 3, 3, 2, 2],
            "threshold": [0.0] * 3 + [0.1] * 2,
            "token_fire_fraction": [0.1, 0.05, 0.02, 0.3, 0.2],
            "dead_fraction": [0.0, 0.2, 0.35, 0.0, 0.01],
        }
    )
    out = plot_sparsity(df, tmp_path / "sparsity.png")
    assert out.exists() and out.stat().st_size > 1000
    assert plt.get_fignums() == []


def test_plot_variability_all_infinite(tmp_path):
    df = pd.DataFrame({"model": ["m"], "layer": [0], "nu": [np.inf]})
    assert plot_variability(df, tmp_path / "empty.png").exists()


def test_plots_with_runner_columns(tmp_path):
    rows = [
        dict(dataset=ds, split="train", model=m, pooling=p, layer=l, n_layers=3, relative_depth=l / 3, nu=1.0 + l)
        for ds in ("sst2", "trec")
        for m in ("bert", "t5")
        for p in ("mean", "first")
        for l in range(4)
    ]
    assert plot_variability(pd.DataFrame(rows), tmp_path / "v.png").exists()
    sp = pd.DataFrame(
        [
            dict(
                dataset=ds,
                split="train",
                model=m,
                layer=l,
                threshold=0.0,
                relative_depth=(l + 1) / 3,
                token_fire_fraction=0.1,
                dead_fraction=0.2,
            )
            for ds in ("sst2", "trec")
            for m in ("bert", "t5")
            for l in range(3)
        ]
    )
    assert plot_sparsity(sp, tmp_path / "s.png").exists()
    assert plt.get_fignums() == []


def test_variability_figure_small_multiples_inf_and_selected_layer():
    from stages.score.plots import variability_figure

    df = pd.DataFrame(
        {
            "model": ["bert"] * 4 + ["llama"] * 4,
            "pooling": ["mean"] * 8,
            "layer": [0, 1, 2, 3] * 2,
            "nu": [np.inf, 1.5, 1.2, 1.4, 2.0, 3.0, np.inf, 1.0],
            "lowest": [False, False, True, False, False, False, False, True],
        }
    )
    fig = variability_figure(df, title="sst2/train: nu")
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["bert", "llama"]  # one panel per model
    for ax in axes:
        assert sum(t.get_text() == "inf" for t in ax.texts) == 1  # infinite nu is shown, not dropped
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert all(float(t).is_integer() for t in ticks)
        stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
        assert len(stars) == 1 and len(stars[0].get_xdata()) == 1  # the selected layer is marked
    assert fig._suptitle.get_text() == "sst2/train: nu"
    assert fig.legends and not any(ax.get_legend() for ax in axes)  # the legend sits outside the panels


def test_sparsity_figure_one_line_per_threshold():
    from stages.score.plots import sparsity_figure

    df = pd.DataFrame(
        {
            "model": ["llama"] * 6,
            "rule": ["abs_gt"] * 6,
            "threshold": [0.1] * 3 + [0.5] * 3,
            "layer": [0, 1, 2] * 2,
            "token_fire_fraction": [0.3, 0.5, 0.7, 0.01, 0.1, 0.3],
            "dead_fraction": [0.0] * 6,
        }
    )
    fig = sparsity_figure(df, title="t")
    top = fig.axes[0]
    assert top.get_title() == "llama" and sorted(top.get_legend_handles_labels()[1]) == ["|a| > 0.1", "|a| > 0.5"]
