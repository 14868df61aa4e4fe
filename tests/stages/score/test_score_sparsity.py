"""Sparsity tables against brute force from token-level activations."""

import math

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from stages.score.sparsity import keyword_mask, sparsity_stats, top_keyword_neurons

THRESHOLD = 0.25
THRESHOLDS = (0.25, 0.0, 1.0)


def make_tokens(seed, n_rows=41, n_layers=3, ffn=23):
    """Per-sentence token activations, float16-representable, with dead,
    rare and class-dependent neurons."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n_rows)
    has_kw = rng.random(n_rows) < 0.4
    shift = rng.normal(-1.5, 1.0, size=(n_layers, ffn))
    shift[:, :4] = -50.0  # dead everywhere
    class_shift = np.zeros((3, n_layers, ffn))
    class_shift[1, :, 4:7] = 2.0  # fire mostly for class 1
    sentences = []
    for i in range(n_rows):
        length = rng.integers(1, 12)
        act = rng.normal(size=(length, n_layers, ffn)) + shift + class_shift[labels[i]]
        act[:, :, 7] += 3.0 * has_kw[i] - 1.5  # keyword-ish neuron
        sentences.append(act.astype(np.float16).astype(np.float32))
    return sentences, labels, has_kw


def extract_like(sentences, shard_sizes, thresholds=None, magnitude=False):
    """What extract stores: per-shard fire counts and token counts, per-row max (of |a| with ``magnitude``).

    Without ``thresholds`` the counts are for THRESHOLD alone, (shards, L, F), as one threshold may be given.
    """
    bounds = np.cumsum([0] + list(shard_sizes))
    fire, ntok = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        tokens = np.concatenate(sentences[a:b])
        stat = np.abs(tokens) if magnitude else tokens
        if thresholds is None:
            fire.append((stat > THRESHOLD).sum(axis=0).astype(np.int64))
        else:
            fire.append(np.stack([(stat > t).sum(axis=0) for t in thresholds]).astype(np.int64))
        ntok.append(len(tokens))
    ffn_max = np.stack([(np.abs(s) if magnitude else s).max(axis=0) for s in sentences]).astype(np.float16)
    return np.stack(fire), np.array(ntok), ffn_max


def hypergeom_sf(k, n, n_kw, n_total):
    """P(X >= k) for X hypergeometric: a direct sum of binomial coefficients."""
    total = math.comb(n_total, n)
    return sum(math.comb(n_kw, i) * math.comb(n_total - n_kw, n - i) for i in range(k, min(n, n_kw) + 1)) / total


def brute_force(sentences, labels, has_kw, thresholds=(THRESHOLD,), magnitude=False):
    """Plain loops over thresholds, layers and neurons from the token activations."""
    rule = "abs_gt" if magnitude else "gt"
    tokens = np.concatenate(sentences)
    if magnitude:
        tokens, sentences = np.abs(tokens), [np.abs(s) for s in sentences]
    n_rows, (_, n_layers, ffn) = len(sentences), tokens.shape
    classes = np.unique(labels)
    base = has_kw.mean()
    layer_rows, neuron_rows = [], []
    for t in thresholds:
        for layer in range(n_layers):
            tok_fire = (tokens[:, layer] > t).sum(axis=0)
            sent_fire = np.array([[(s[:, layer, f] > t).any() for f in range(ffn)] for s in sentences])
            layer_rows.append(
                dict(
                    threshold=t,
                    rule=rule,
                    layer=layer,
                    n_neurons=ffn,
                    token_fire_fraction=tok_fire.sum() / (len(tokens) * ffn),
                    dead_fraction=np.mean(tok_fire == 0),
                    sentence_fire_fraction=sent_fire.mean(),
                )
            )
            for f in range(ffn):
                fires = sent_fire[:, f]
                rates = np.array([fires[labels == c].mean() for c in classes])
                top = rates.max()
                others = np.delete(rates, rates.argmax()).mean()
                n, k = int(fires.sum()), int((fires & has_kw).sum())
                score = k / n if n else np.nan
                neuron_rows.append(
                    dict(
                        threshold=t,
                        layer=layer,
                        neuron=f,
                        token_fire_rate=tok_fire[f] / len(tokens),
                        sentence_fire_rate=fires.mean(),
                        n_fire_sentences=n,
                        n_keyword_fire_sentences=k,
                        keyword_score=score,
                        keyword_base_rate=base,
                        keyword_lift=score / base,
                        keyword_p_value=hypergeom_sf(k, n, int(has_kw.sum()), n_rows) if n else np.nan,
                        selectivity=(top - others) / (top + others) if top > 0 else 0.0,
                        top_class=classes[rates.argmax()] if n else -1,
                    )
                )
    return pd.DataFrame(layer_rows), pd.DataFrame(neuron_rows)


@pytest.mark.parametrize("seed, thresholds, magnitude", [(0, None, False), (1, None, False), (0, THRESHOLDS, False), (1, THRESHOLDS, True)])
def test_every_column_matches_brute_force(seed, thresholds, magnitude):
    sentences, labels, has_kw = make_tokens(seed)
    fire, ntok, ffn_max = extract_like(sentences, [9, 20, 12], thresholds, magnitude)
    chunks = (1, 3, 23) if thresholds is None else (1, 2, 3, 23)
    layers, neurons = sparsity_stats(
        da.from_array(fire, chunks=chunks),
        ntok,
        da.from_array(ffn_max, chunks=(9, 2, 10)),
        labels,
        has_kw,
        thresholds or THRESHOLD,
        rule="abs_gt" if magnitude else "gt",
    )
    want_layers, want_neurons = brute_force(sentences, labels, has_kw, thresholds or (THRESHOLD,), magnitude)
    assert list(layers.columns) == list(want_layers.columns)
    pd.testing.assert_frame_equal(layers, want_layers, check_dtype=False, rtol=1e-12)
    assert list(neurons.columns) == list(want_neurons.columns)
    pd.testing.assert_frame_equal(neurons, want_neurons, check_dtype=False, rtol=1e-12)
    # the data exercise every branch (under |a| > t the "dead" neurons, far below zero, fire everywhere)
    if magnitude:
        assert (layers["dead_fraction"] == 0).all() and not layers.equals(brute_force(sentences, labels, has_kw, thresholds)[0])
    else:
        assert (layers["dead_fraction"] > 0).all()
        assert neurons["keyword_score"].isna().any()
        assert (neurons["selectivity"] > 0.5).any()
        assert (neurons["keyword_p_value"] < 0.01).any() and (neurons["keyword_p_value"] > 0.5).any()


def test_numpy_inputs_and_single_class():
    sentences, labels, has_kw = make_tokens(3, n_rows=10)
    fire, ntok, ffn_max = extract_like(sentences, [10])
    _, neurons = sparsity_stats(fire, ntok, ffn_max, np.zeros(10, int), has_kw, THRESHOLD)
    assert neurons["selectivity"].isna().all()


def test_threshold_compared_in_float64():
    # The threshold sits just below a float16 value v and rounds up to v in
    # float16: a float16 compare would say "not above", float64 says above.
    v = np.float16(0.1)
    threshold = float(v) - 1e-6
    assert np.float16(threshold) == v
    ffn_max = np.full((2, 1, 1), v, dtype=np.float16)
    _, neurons = sparsity_stats(np.zeros((1, 1, 1), np.int64), [3], ffn_max, [0, 1], [True, False], threshold)
    assert neurons["sentence_fire_rate"].iloc[0] == 1.0


def test_shape_checks():
    with pytest.raises(ValueError, match="disagree"):
        sparsity_stats(np.zeros((1, 2, 3), np.int64), [1], np.zeros((4, 2, 5)), np.zeros(4), np.zeros(4, bool), 0.0)
    with pytest.raises(ValueError, match="per shard"):
        sparsity_stats(np.zeros((2, 2, 3), np.int64), [1], np.zeros((4, 2, 3)), np.zeros(4), np.zeros(4, bool), 0.0)


def test_keyword_mask():
    texts = ["Quantum PHYSICS rocks", "astrophysics is fun", "I like math.", "Machine\tlearning!", "machine-learning", "nothing here", ""]
    mask = keyword_mask(texts, ["physics", "math", "machine learning", "  "])
    assert mask.tolist() == [True, False, True, True, False, False, False]
    # a hyphen joins words: science-fiction is not science; case and a possessive do not matter
    sci = keyword_mask(["a science-fiction film", "SCIENCE wins", "the computer's fan", "sci-fi"], ["science", "computer"])
    assert sci.tolist() == [False, True, True, False]
    assert not keyword_mask(texts, []).any()
    assert keyword_mask(["I code in C++ daily"], ["c++"]).tolist() == [True]


def test_top_keyword_neurons_rank_by_significance_not_score():
    """A neuron whose 3 keyword sentences out of 6 give a high score loses to 40 of 200 at a lower score."""
    n_total, n_kw = 1000, 50  # base rate 0.05
    n = np.array([6, 200, 30, 2, 50, 50])
    k = np.array([3, 40, 3, 2, 0, 10])
    from stages.score.sparsity import keyword_p_values

    df = pd.DataFrame(
        {
            "layer": [0, 0, 0, 0, 1, 1],
            "neuron": [0, 1, 2, 3, 0, 1],
            "n_fire_sentences": n,
            "keyword_score": k / n,
            "keyword_lift": k / n / 0.05,
            "keyword_p_value": keyword_p_values(k, n, n_kw, n_total),
        }
    )
    for i in range(len(n)):
        assert df["keyword_p_value"][i] == pytest.approx(hypergeom_sf(int(k[i]), int(n[i]), n_kw, n_total), rel=1e-9)
    top = top_keyword_neurons(df, 2)
    assert list(zip(top["layer"], top["neuron"])) == [(0, 1), (0, 0), (1, 1), (1, 0)]
    assert df["keyword_score"][0] > df["keyword_score"][1]  # the higher score ranks lower
    assert len(top_keyword_neurons(df, 5, min_fire_sentences=1)) == 6


def test_top_keyword_neurons_are_per_model_when_models_share_layer_indices():
    """Two models' layer 0: the weaker model still gets its own top neurons (they once competed for one layer's k places)."""
    df = pd.DataFrame(
        {
            "model": ["strong"] * 3 + ["weak"] * 3,
            "threshold": [0.0] * 6,
            "layer": [0] * 6,
            "neuron": [0, 1, 2, 0, 1, 2],
            "n_fire_sentences": [50] * 6,
            "keyword_lift": [5.0, 4.0, 3.0, 1.2, 1.1, 1.0],
            "keyword_p_value": [1e-30, 1e-20, 1e-10, 0.1, 0.2, 0.3],
        }
    )
    top = top_keyword_neurons(df, 2)
    assert list(zip(top["model"], top["neuron"])) == [("strong", 0), ("strong", 1), ("weak", 0), ("weak", 1)]


def test_stem_keyword_list_loads():
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "configs" / "keywords" / "stem.txt"
    words = [w.strip() for w in path.read_text().splitlines() if w.strip()]
    assert len(words) >= 50 and len(set(words)) == len(words)
    assert keyword_mask(["A new algorithm for physics"], words).all()


@pytest.mark.parametrize("n_total, n_kw", [(12, 5), (9, 0), (9, 9), (1, 1), (17, 16)])
def test_hypergeom_sf_matches_exact_sums_on_every_pair(n_total, n_kw):
    """Every (k, n) of the support, and k beyond it, against sums of binomial coefficients."""
    from stages.score import sparsity

    pairs = [(k, n) for n in range(n_total + 1) for k in range(-1, n + 2)]
    k, n = np.array(pairs).T
    got = sparsity.hypergeom_sf(k, n, n_kw, n_total)
    want = [hypergeom_sf(max(int(a), 0), int(b), n_kw, n_total) for a, b in pairs]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("block", [1, 50, 2**21])
def test_hypergeom_sf_matches_scipy_in_the_tails_whatever_the_blocks(monkeypatch, block):
    """Large populations, deep tails and blocks of one draw count or many give scipy's p-values."""
    from scipy.stats import hypergeom

    from stages.score import sparsity

    monkeypatch.setattr(sparsity, "_SF_BLOCK", block)
    rng = np.random.default_rng(block)
    n_total, n_kw = 20000, 700
    n = rng.integers(0, n_total + 1, 400)
    lo, hi = np.maximum(0, n - (n_total - n_kw)), np.minimum(n, n_kw)
    k = np.minimum(lo + (rng.random(400) * (hi - lo + 1)).astype(np.int64), hi)
    k[:20], k[20:40] = hi[:20], lo[20:40]  # the extremes of each support
    want = hypergeom.sf(k - 1, n_total, n_kw, n)
    got = sparsity.hypergeom_sf(k.reshape(20, 20), n.reshape(20, 20), n_kw, n_total).ravel()
    tiny = want < 1e-290
    np.testing.assert_allclose(got[~tiny], want[~tiny], rtol=1e-9)
    assert (got[tiny] < 1e-280).all() and (got[~tiny] > 0).all()


def test_hypergeom_sf_rejects_impossible_populations():
    from stages.score import sparsity

    with pytest.raises(ValueError, match="n_keyword"):
        sparsity.hypergeom_sf(np.array([0]), np.array([3]), 11, 10)
    with pytest.raises(ValueError, match="n_total"):
        sparsity.hypergeom_sf(np.array([0]), np.array([11]), 3, 10)
