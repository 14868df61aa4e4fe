"""Attention sinks: a decoder whose tokenizer adds no BOS gets one in front, kept out of pooling and firing.

The reference runs the tiny Llama on ``[BOS] + ids`` by hand and pools over the real tokens only;
the stored per-layer token-norm ratio is checked against a loop over token norms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from extract_helpers import TEXTS, make_request

from pipeline.errors import ModelError
from pipeline.models.families import family_of, sink_token_id
from pipeline.models.random_init import random_model
from stages.extract.runner import LoadedModel, extract_entry
from store import Store


def _no_bos_llama():
    """The tiny Llama with a tokenizer that adds no special tokens (as SmolLM2's does not)."""
    from tokenizers import processors

    model, tokenizer = random_model("llama")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert tokenizer("good")["input_ids"][0] != tokenizer.bos_token_id
    return model, tokenizer


def _loader(model, tokenizer):
    return lambda: LoadedModel(model, tokenizer, family_of(model.config), torch.device("cpu"))


def _reference(model, tokenizer, sink: bool, max_length: int = 24):
    """Per text: hidden mean over real tokens, first real and last token, FFN fire counts at |a| > 0.05, norm ratio."""
    ffn = []
    hooks = [
        model.layers[i].mlp.down_proj.register_forward_hook(lambda m, a, o: ffn.append(a[0][0].double())) for i in range(len(model.layers))
    ]
    rows = []
    try:
        for text in TEXTS:
            ids = tokenizer(text, truncation=True, max_length=max_length - (1 if sink else 0))["input_ids"]
            if sink:
                ids = [tokenizer.bos_token_id, *ids]
            ffn.clear()
            with torch.no_grad():
                hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            real = slice(1 if sink else 0, len(ids))
            norms = [h[0, real].double().norm(dim=-1).sort().values for h in hs]
            rows.append(
                {
                    "mean": np.stack([h[0, real].double().mean(0).numpy() for h in hs]),
                    "first": np.stack([h[0, real.start].double().numpy() for h in hs]),
                    "last": np.stack([h[0, -1].double().numpy() for h in hs]),
                    "fire": np.stack([(f[real].abs() > 0.05).sum(0).numpy() for f in ffn]),
                    "ratio": np.array([float(n[-1] / n[(len(n) - 1) // 2]) for n in norms]),
                    "n_tokens": len(ids),
                }
            )
    finally:
        for h in hooks:
            h.remove()
    return rows


@pytest.mark.parametrize("sink", ["auto", "none"])
def test_sink_is_prepended_and_kept_out_of_pooling(tmp_path, sink):
    model, tokenizer = _no_bos_llama()
    request = make_request("llama", sink=sink, thresholds=(0.05,), storage_dtype="float32")
    store = Store(tmp_path)
    assert extract_entry(request, store, _loader(model, tokenizer), progress=False).committed
    entry = store.open(request.key)
    ref = _reference(model, tokenizer, sink=sink == "auto")
    mean, last = entry.array("hidden/mean").compute(), entry.array("hidden/last").compute()
    first = entry.array("hidden/first").compute()
    for r, want in enumerate(ref):
        np.testing.assert_allclose(mean[r], want["mean"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(first[r], want["first"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(last[r], want["last"], rtol=1e-4, atol=1e-4)
    assert entry.table()["n_tokens"].tolist() == [w["n_tokens"] for w in ref]
    fire = entry.per_shard("ffn/fire_count").compute().sum(axis=0)[0]
    want_fire = sum(w["fire"] for w in ref)
    assert np.abs(fire - want_fire).max() <= 2  # float32 rounding of activations near the threshold
    ratio = entry.array("stats/norm_ratio").compute()
    np.testing.assert_allclose(ratio, np.stack([w["ratio"] for w in ref]), rtol=1e-4)
    attrs = entry.shard_attrs("ffn/fire_count")[0]
    assert attrs["sink_token"] == (tokenizer.bos_token_id if sink == "auto" else -1)
    if sink == "auto":  # the sink's states really are out of the mean: it differs from a run without a sink
        plain = _reference(model, tokenizer, sink=False)
        assert not np.allclose(mean[0], plain[0]["mean"], atol=1e-3)
        # `first` is the first real token, not the sink, whose causal state is one vector for every text.
        assert not np.allclose(first[0, 1:], first[1, 1:], atol=1e-3)


def test_sink_token_choice():
    model, tokenizer = _no_bos_llama()
    fam = family_of(model.config)
    assert sink_token_id(tokenizer, fam, "auto") == tokenizer.bos_token_id
    assert sink_token_id(tokenizer, fam, "none") is None
    assert sink_token_id(tokenizer, fam, "</s>") == tokenizer.eos_token_id
    with pytest.raises(ModelError, match="models.sink"):
        sink_token_id(tokenizer, fam, "<not-a-token>")
    # a tokenizer that adds BOS itself needs no sink; an encoder never gets one under 'auto'
    _, with_bos = random_model("llama")
    assert sink_token_id(with_bos, fam, "auto") is None
    bert, bert_tok = random_model("bert")
    assert sink_token_id(bert_tok, family_of(bert.config), "auto") is None


def test_truncation_leaves_room_for_the_sink(tmp_path):
    model, tokenizer = _no_bos_llama()
    request = make_request("llama", sink="auto", max_length=8)
    store = Store(tmp_path)
    extract_entry(request, store, _loader(model, tokenizer), progress=False)
    table = store.open(request.key).table()
    assert table["n_tokens"].max() == 8 and table["truncated"].sum() >= 1
