"""FusionHead: learns what no single block (or their concatenation) can, reproducibly."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from stages.train.fusion import ConcatHead, FusionHead
from stages.train.probes import evaluate, fit_probe


def test_xor_task_is_linearly_unlearnable(xor_data):
    (Xtr, ytr), (Xdv, ydv), (Xte, yte) = xor_data
    for name in ("a", "b"):
        res = fit_probe(Xtr[name], ytr, Xdv[name], ydv)
        assert evaluate(res.model, Xte[name], yte)["accuracy"] < 0.6
    concat = ConcatHead().fit(Xtr, ytr, Xdv, ydv)
    assert evaluate(concat, Xte, yte)["accuracy"] < 0.6


def test_fusion_learns_xor(xor_data, fitted_fusion):
    _, _, (Xte, yte) = xor_data
    head = fitted_fusion
    assert evaluate(head, Xte, yte)["accuracy"] > 0.85
    assert head.block_names_ == ["a", "b"]
    assert head.block_dims_ == {"a": 8, "b": 6}
    assert head.classes_.tolist() == [0, 1]
    assert 1 <= head.best_epoch_ <= len(head.history_) <= 40
    assert head.best_dev_accuracy_ == max(h["dev_accuracy"] for h in head.history_)
    assert head.n_params_ == sum(p.numel() for p in head.net_.parameters())
    assert head.fit_seconds_ > 0
    proba = head.predict_proba(Xte)
    assert proba.shape == (yte.size, 2) and proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)


def test_fusion_input_width_counts_pairs_with_diagonal(fitted_fusion):
    first = fitted_fusion.net_.mlp[0]
    m, width = 2, 32
    assert first.in_features == m * (m + 1) // 2 + m * width


def test_same_seed_same_predictions_other_seed_differs(xor_data, fitted_fusion, fusion_kwargs):
    (Xtr, ytr), (Xdv, ydv), (Xte, _) = xor_data
    again = FusionHead(**fusion_kwargs()).fit(Xtr, ytr, Xdv, ydv)
    assert np.array_equal(again.predict_proba(Xte), fitted_fusion.predict_proba(Xte))
    assert again.history_ == fitted_fusion.history_
    other = FusionHead(**fusion_kwargs(seed=1, epochs=2)).fit(Xtr, ytr, Xdv, ydv)
    short = FusionHead(**fusion_kwargs(epochs=2)).fit(Xtr, ytr, Xdv, ydv)
    assert not np.array_equal(other.predict_proba(Xte), short.predict_proba(Xte))


def test_fit_leaves_the_callers_rng_alone(xor_data, fusion_kwargs):
    (Xtr, ytr), (Xdv, ydv), _ = xor_data
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    FusionHead(**fusion_kwargs(epochs=1)).fit(Xtr, ytr, Xdv, ydv)
    assert torch.equal(torch.rand(3), expected)


def test_block_order_in_the_dict_does_not_matter(xor_data, fitted_fusion):
    _, _, (Xte, _) = xor_data
    reordered = {"b": Xte["b"], "a": Xte["a"]}
    assert np.array_equal(fitted_fusion.predict_proba(reordered), fitted_fusion.predict_proba(Xte))


def test_avg_keys_average_is_fed_to_the_mlp(fusion_kwargs):
    rng = np.random.default_rng(0)
    X = {f"llama/L-{i}": rng.normal(size=(120, 5)) for i in (1, 2, 3)}
    X["bert/first"] = rng.normal(size=(120, 4))
    y = (X["llama/L-1"][:, 0] + X["llama/L-2"][:, 0] > 0).astype(int)
    head = FusionHead(**fusion_kwargs(epochs=3, width=8, hidden=8)).fit(X, y, X, y, avg_keys=["llama/L-1", "llama/L-2"])
    assert head.avg_keys_ == ["llama/L-1", "llama/L-2"]
    m = 4
    assert head.net_.mlp[0].in_features == m * (m + 1) // 2 + m * 8 + 5


def test_predict_before_fit_raises_not_fitted():
    with pytest.raises(NotFittedError):
        FusionHead().predict({"a": np.zeros((2, 3))})
    with pytest.raises(NotFittedError):
        ConcatHead().predict_proba({"a": np.zeros((2, 3))})
    with pytest.raises(NotFittedError):
        FusionHead().to_bytes()


@pytest.mark.parametrize("make_head", ["fusion", "concat"])
def test_wrong_blocks_at_predict_name_the_block(xor_data, fitted_fusion, make_head):
    (Xtr, ytr), (Xdv, ydv), (Xte, _) = xor_data
    if make_head == "fusion":
        head, owner = fitted_fusion, "FusionHead"
    else:
        head, owner = ConcatHead(Cs=(1.0,)).fit(Xtr, ytr, Xdv, ydv), "ConcatHead"
    with pytest.raises(ValueError, match=re.escape(f"{owner}: block 'b' has 5 features, but {owner} was fitted with 6 features for it")):
        head.predict({"a": Xte["a"], "b": Xte["b"][:, :5]})
    with pytest.raises(ValueError, match=re.escape(f"{owner}: missing input block(s) ['b']")):
        head.predict_proba({"a": Xte["a"]})
    with pytest.raises(ValueError, match=re.escape(f"{owner}: unexpected input block(s) ['c']")):
        head.predict({**Xte, "c": Xte["a"]})
    with pytest.raises(ValueError, match=re.escape(f"{owner}: block 'a' in inputs contains NaN or infinity")):
        head.predict({"a": np.full_like(Xte["a"], np.nan), "b": Xte["b"]})
    with pytest.raises(ValueError, match=re.escape(f"{owner}: block 'b' in inputs has 3 rows")):
        head.predict({"a": Xte["a"], "b": Xte["b"][:3]})


def test_fit_errors_name_the_problem(xor_data):
    (Xtr, ytr), (Xdv, ydv), _ = xor_data
    with pytest.raises(ValueError, match=re.escape("FusionHead: parameter width=0 is invalid; expected an int >= 1")):
        FusionHead(width=0).fit(Xtr, ytr, Xdv, ydv)
    with pytest.raises(ValueError, match=re.escape("FusionHead: parameter dropout=1.0 is invalid")):
        FusionHead(dropout=1.0).fit(Xtr, ytr, Xdv, ydv)
    with pytest.raises(ValueError, match=re.escape("FusionHead: parameter device='tpu?' is invalid")):
        FusionHead(device="tpu?").fit(Xtr, ytr, Xdv, ydv)
    with pytest.raises(ValueError, match=re.escape("ConcatHead: parameter Cs=() is invalid")):
        ConcatHead(Cs=()).fit(Xtr, ytr, Xdv, ydv)
    with pytest.raises(ValueError, match=re.escape("FusionHead: avg_keys names unknown block(s) ['z']")):
        FusionHead().fit(Xtr, ytr, Xdv, ydv, avg_keys=["z"])
    with pytest.raises(ValueError, match=re.escape("FusionHead: avg_keys blocks must share a width, got {'a': 8, 'b': 6}")):
        FusionHead().fit(Xtr, ytr, Xdv, ydv, avg_keys=["a", "b"])
    with pytest.raises(ValueError, match=re.escape("FusionHead: block 'b' has 5 features")):
        FusionHead().fit(Xtr, ytr, {"a": Xdv["a"], "b": Xdv["b"][:, :5]}, ydv)
    with pytest.raises(ValueError, match=re.escape("FusionHead: y_dev has labels not in y_train: [7]")):
        FusionHead().fit(Xtr, ytr, Xdv, np.where(ydv == 1, 7, 0))
    with pytest.raises(ValueError, match=re.escape("FusionHead: y_train must be 1-D with 1000 labels")):
        FusionHead().fit(Xtr, ytr[:10], Xdv, ydv)


def test_init_only_stores_parameters():
    head = FusionHead(width=-5, device="nonsense")  # validated at fit, like scikit-learn
    assert head.get_params()["width"] == -5
    assert not [k for k in vars(head) if k.endswith("_")]
    with pytest.raises(TypeError):
        FusionHead(16)  # keyword-only
