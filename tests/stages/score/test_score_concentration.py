"""The class-concentration table of keyword neurons counts only neurons that are significant."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.score.runner import class_concentration


def test_only_significant_neurons_count_and_a_model_without_any_gets_zeros():
    # AG News as measured: MiniLM's keyword neurons are significant and sit on class 3 (Sci/Tech);
    # SmolLM2's "top" neurons fire in almost every sentence, p ~ 0.5, on arbitrary classes.
    top = pd.DataFrame(
        {
            "model": ["bert"] * 4 + ["llama"] * 3,
            "keyword_p_value": [1e-90, 1e-50, 1e-40, 0.3, 0.56, 0.31, 0.82],
            "top_class": [3, 3, 2, 0, 0, 1, 0],
        }
    )
    labels = np.repeat(np.arange(4), 5)
    has_kw = np.isin(np.arange(20), [16, 17, 18, 12])
    table = class_concentration(top, labels, has_kw, p_max=1e-6).set_index("model")
    assert table.loc["bert", "neurons"] == 3
    assert table.loc["bert", ["top_class=0", "top_class=1", "top_class=2", "top_class=3"]].tolist() == [0, 0, 1, 2]
    assert table.loc["llama", "neurons"] == 0
    assert table.loc["llama", ["top_class=0", "top_class=1", "top_class=2", "top_class=3"]].tolist() == [0, 0, 0, 0]
    assert table.loc["(class share of sentences)", "top_class=3"] == 0.25
    assert table.loc["(keyword rate in the class)", "top_class=3"] == 0.6
