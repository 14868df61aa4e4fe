"""Which layers selection may pick: one rule (candidate_layers) for one model's table or several."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.blocks import among_candidates, candidate_layers


@pytest.mark.parametrize("include_embeddings", [False, True])
def test_each_model_is_judged_by_its_own_depth(include_embeddings):
    # "deep" has hidden states 0..3; "flat" keeps one hidden state (a pooler output): its only row stays a candidate
    df = pd.DataFrame({"models": ["deep"] * 4 + ["flat"], "layers": ["0", "1", "2", "3", "0"], "acc": range(5)})
    got = among_candidates(df, include_embeddings, layer="layers", model="models")
    want = [
        (m, int(lay))
        for m, lay in zip(df["models"], df["layers"])
        if int(lay) in candidate_layers(4 if m == "deep" else 1, include_embeddings)
    ]
    assert list(zip(got["models"], got["layers"].astype(int))) == want
    assert ("flat", 0) in want and (("deep", 0) in want) == include_embeddings


def test_one_model_table_and_empty_table():
    df = pd.DataFrame({"layer": [0, 1, 2]})
    assert list(among_candidates(df)["layer"]) == [1, 2]
    assert list(among_candidates(df, True)["layer"]) == [0, 1, 2]
    assert among_candidates(df.iloc[:0]).empty
