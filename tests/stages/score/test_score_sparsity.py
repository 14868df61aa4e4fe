"""Sparsity tables against brute force from token-level activations."""

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from stages.score.sparsity import keyword_mask, sparsity_stats, top_keyword_neurons

THRESHOLD = 0.25


def make_tokens(seed, n_rows=41, n_layers=3, ffn=23):
    """Per-sentence token activations, float16-representable, with dead,
    rare and class-dependent neurons."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n_rows)
    has_kw = rng.random(n_rows) < 0.4
    shift = rng.normal(-1.5, 1.0, size=(n_layers, ffn))
    shift[:, :4] = -50.0                      # dead everywhere
    class_shift = np.zeros((3, n_layers, ffn))
    class_shift[1, :, 4:7] = 2.0              # fire mostly for class 1
    sentences = []
    for i in range(n_rows):
        length = rng.integers(1, 12)
        act = rng.normal(size=(length, n_layers, ffn)) + shift + class_shift[labels[i]]
        act[:, :, 7] += 3.0 * has_kw[i] - 1.5  # keyword-ish neuron
        sentences.append(act.astype(np.float16).astype(np.float32))
    return sentences, labels, has_kw


def extract_like(sentences, shard_sizes):
    """What extract stores: per-shard fire counts and token counts, per-row max."""
    bounds = np.cumsum([0] + list(shard_sizes))
    fire, ntok = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        tokens = np.concatenate(sentences[a:b])
        fire.append((tokens > THRESHOLD).sum(axis=0).astype(np.int64))
        ntok.append(len(tokens))
    ffn_max = np.stack([s.max(axis=0) for s in sentences]).astype(np.float16)
    return np.stack(fire), np.array(ntok), ffn_max


def brute_force(sentences, labels, has_kw):
    """Plain loops over layers and neurons from the token activations."""
    tokens = np.concatenate(sentences)
    n_rows, (_, n_layers, ffn) = len(sentences), tokens.shape
    classes = np.unique(labels)
    layer_rows, neuron_rows = [], []
    for layer in range(n_layers):
        tok_fire = (tokens[:, layer] > THRESHOLD).sum(axis=0)
        sent_fire = np.array([[(s[:, layer, f] > THRESHOLD).any() for f in range(ffn)]
                              for s in sentences])
        layer_rows.append(dict(
            layer=layer, n_neurons=ffn, threshold=THRESHOLD,
            token_fire_fraction=tok_fire.sum() / (len(tokens) * ffn),
            dead_fraction=np.mean(tok_fire == 0),
            sentence_fire_fraction=sent_fire.mean()))
        for f in range(ffn):
            fires = sent_fire[:, f]
            rates = np.array([fires[labels == c].mean() for c in classes])
            top = rates.max()
            others = np.delete(rates, rates.argmax()).mean()
            neuron_rows.append(dict(
                layer=layer, neuron=f,
                token_fire_rate=tok_fire[f] / len(tokens),
                sentence_fire_rate=fires.mean(),
                n_fire_sentences=fires.sum(),
                keyword_score=has_kw[fires].mean() if fires.any() else np.nan,
                selectivity=(top - others) / (top + others) if top > 0 else 0.0))
    return pd.DataFrame(layer_rows), pd.DataFrame(neuron_rows)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_column_matches_brute_force(seed):
    sentences, labels, has_kw = make_tokens(seed)
    fire, ntok, ffn_max = extract_like(sentences, [9, 20, 12])
    layers, neurons = sparsity_stats(
        da.from_array(fire, chunks=(1, 3, 23)), ntok,
        da.from_array(ffn_max, chunks=(9, 2, 10)), labels, has_kw, THRESHOLD)
    want_layers, want_neurons = brute_force(sentences, labels, has_kw)
    assert list(layers.columns) == list(want_layers.columns)
    pd.testing.assert_frame_equal(layers, want_layers, check_dtype=False,
                                  rtol=1e-12)
    assert list(neurons.columns) == list(want_neurons.columns)
    pd.testing.assert_frame_equal(neurons, want_neurons, check_dtype=False,
                                  rtol=1e-12)
    # the data exercise every branch
    assert (layers["dead_fraction"] > 0).all()
    assert neurons["keyword_score"].isna().any()
    assert (neurons["selectivity"] > 0.5).any()


def test_numpy_inputs_and_single_class():
    sentences, labels, has_kw = make_tokens(3, n_rows=10)
    fire, ntok, ffn_max = extract_like(sentences, [10])
    _, neurons = sparsity_stats(fire, ntok, ffn_max, np.zeros(10, int),
                                has_kw, THRESHOLD)
    assert neurons["selectivity"].isna().all()


def test_threshold_compared_in_float64():
    # The threshold sits just below a float16 value v and rounds up to v in
    # float16: a float16 compare would say "not above", float64 says above.
    v = np.float16(0.1)
    threshold = float(v) - 1e-6
    assert np.float16(threshold) == v
    ffn_max = np.full((2, 1, 1), v, dtype=np.float16)
    _, neurons = sparsity_stats(np.zeros((1, 1, 1), np.int64), [3], ffn_max,
                                [0, 1], [True, False], threshold)
    assert neurons["sentence_fire_rate"].iloc[0] == 1.0


def test_shape_checks():
    with pytest.raises(ValueError, match="disagree"):
        sparsity_stats(np.zeros((1, 2, 3), np.int64), [1],
                       np.zeros((4, 2, 5)), np.zeros(4), np.zeros(4, bool), 0.0)
    with pytest.raises(ValueError, match="per shard"):
        sparsity_stats(np.zeros((2, 2, 3), np.int64), [1],
                       np.zeros((4, 2, 3)), np.zeros(4), np.zeros(4, bool), 0.0)


def test_keyword_mask():
    texts = ["Quantum PHYSICS rocks", "astrophysics is fun", "I like math.",
             "Machine\tlearning!", "machine-learning", "nothing here", ""]
    mask = keyword_mask(texts, ["physics", "math", "machine learning", "  "])
    assert mask.tolist() == [True, False, True, True, False, False, False]
    assert not keyword_mask(texts, []).any()
    assert keyword_mask(["I code in C++ daily"], ["c++"]).tolist() == [True]


def test_top_keyword_neurons():
    df = pd.DataFrame({
        "layer": [0, 0, 0, 0, 1, 1],
        "neuron": [0, 1, 2, 3, 0, 1],
        "sentence_fire_rate": [0.1, 0.3, 0.2, 0.9, 0.5, 0.5],
        "n_fire_sentences": [10, 30, 20, 2, 50, 50],
        "keyword_score": [0.5, 0.5, 0.9, 1.0, np.nan, 0.2],
    })
    top = top_keyword_neurons(df, 2)
    assert list(zip(top["layer"], top["neuron"])) == [(0, 2), (0, 1), (1, 1)]
    assert len(top_keyword_neurons(df, 5, min_fire_sentences=1)) == 5


def test_stem_keyword_list_loads():
    from pathlib import Path
    path = Path(__file__).resolve().parents[3] / "configs" / "keywords" / "stem.txt"
    words = [w.strip() for w in path.read_text().splitlines() if w.strip()]
    assert len(words) >= 50 and len(set(words)) == len(words)
    assert keyword_mask(["A new algorithm for physics"], words).all()
