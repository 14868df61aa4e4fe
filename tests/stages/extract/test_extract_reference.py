"""Stored features against a plain, independent recomputation, for every family.

The reference runs each text alone (a batch of one, no padding at all) and again inside a
hand-built left-padded and right-padded batch of all texts, catches the FFN activations
with a plain forward hook on each block's FFN output projection (paths written out here,
not taken from ``pipeline.models.families``), and pools token by token in Python loops.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from extract_helpers import FAMILIES, LONG_ROW, TEXTS, CountingLoader, make_request

from pipeline.models.random_init import TINY, random_model
from stages.extract.batching import plan_batches
from stages.extract.runner import extract_entry
from store import Store

# Where each architecture keeps its FFN output projection (its input is the FFN activation).
FFN_OUT = {
    "bert": lambda m, i: m.encoder.layer[i].output.dense,
    "roberta": lambda m, i: m.encoder.layer[i].output.dense,
    "mpnet": lambda m, i: m.encoder.layer[i].output.dense,
    "t5": lambda m, i: m.encoder.block[i].layer[1].DenseReluDense.wo,
    "llama": lambda m, i: m.layers[i].mlp.down_proj,
}
# A neuron's activation this close to the threshold may legitimately flip between a padded,
# batched forward and the unpadded reference (float32 rounding); anything else must match exactly.
NEAR = 1e-5
# Candidate thresholds; the test keeps those with no activation of the toy data within NEAR of them
# (at least two per family): there the stored fire counts must equal the unpadded float32
# reference exactly, with no slack at all, for every threshold of one extract pass.
CANDIDATE_THRESHOLDS = (0.012, 0.03, 0.05, 0.08, 0.1, 0.2, 0.3)
# The firing rule each family must get: a > t, except |a| > t for gated FFNs (Llama's silu(gate) * up).
MAGNITUDE = {"llama": True, "bert": False, "roberta": False, "mpnet": False, "t5": False}
DEFAULT_THRESHOLDS = (0.0, 0.05)
N_LAYERS, HIDDEN, FFN = TINY.layers, TINY.hidden, TINY.ffn


def _tokens(tokenizer, text: str, max_length: int):
    enc = tokenizer(text, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    full = tokenizer(text, truncation=False)["input_ids"]
    return enc["input_ids"], enc["special_tokens_mask"], len(full) > max_length


def _forward(model, family, input_ids, attention_mask, position_ids=None):
    """Hidden states (list of (B, T, H)) and FFN inputs (list of (B, T, F)) as float64 numpy."""
    captured = []
    handles = [
        FFN_OUT[family](model, i).register_forward_hook(lambda mod, args, out: captured.append(args[0].detach().clone()))
        for i in range(N_LAYERS)
    ]
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert len(out.hidden_states) == N_LAYERS + 1 and len(captured) == N_LAYERS
    return [h.double().numpy() for h in out.hidden_states], [c.double().numpy() for c in captured]


def _per_text_tokens(model, family, toks, mode, pad_id):
    """For each text: (hidden (L+1, n, H), ffn (L, n, F)) over its real tokens, run alone or in a padded batch."""
    if mode == "single":
        out = []
        for ids, _ in toks:
            x = torch.tensor([ids])
            hs, ffn = _forward(model, family, x, torch.ones_like(x))
            out.append((np.stack([h[0] for h in hs]), np.stack([f[0] for f in ffn])))
        return out
    width = max(len(ids) for ids, _ in toks)
    input_ids = torch.full((len(toks), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(toks), width), dtype=torch.long)
    spans = []
    for r, (ids, _) in enumerate(toks):
        start = 0 if mode == "right" else width - len(ids)
        input_ids[r, start : start + len(ids)] = torch.tensor(ids)
        attention[r, start : start + len(ids)] = 1
        spans.append((start, start + len(ids)))
    position_ids = None
    if mode == "left" and family in ("llama", "bert"):
        # Absolute positions (BERT) and RoPE (Llama) are taken from 0..T-1, not from the mask:
        # give real tokens the positions they have when run alone. RoBERTa and MPNet derive
        # absolute positions from non-pad ids themselves (MPNet's relative attention bias depends
        # on j - i only); T5 uses relative positions only.
        position_ids = (attention.cumsum(dim=1) - 1).clamp_min(0)
    hs, ffn = _forward(model, family, input_ids, attention, position_ids)
    return [(np.stack([h[r, a:b] for h in hs]), np.stack([f[r, a:b] for f in ffn])) for r, (a, b) in enumerate(spans)]


def _pool(hidden, ffn, special, *, include_special, thresholds, magnitude):
    """Pool one text token by token. hidden (L+1, n, H), ffn (L, n, F), special: list of 0/1 per token."""
    n = hidden.shape[1]
    counted = [t for t in range(n) if include_special or not special[t]]
    if not counted:  # all special after truncation: fall back to every real token
        counted = list(range(n))
    h_sum = np.zeros(hidden[:, 0].shape)
    f_sum = np.zeros(ffn[:, 0].shape)
    f_max = np.full(ffn[:, 0].shape, -np.inf)
    f_absmax = np.full(ffn[:, 0].shape, -np.inf)
    fired = np.zeros((len(thresholds), *ffn[:, 0].shape), dtype=np.int64)
    near = np.zeros_like(fired)
    for t in counted:
        h_sum += hidden[:, t]
        f_sum += ffn[:, t]
        f_max = np.maximum(f_max, ffn[:, t])
        f_absmax = np.maximum(f_absmax, np.abs(ffn[:, t]))
        stat = np.abs(ffn[:, t]) if magnitude else ffn[:, t]
        for i, thr in enumerate(thresholds):
            fired[i] += stat > thr
            near[i] += (np.abs(stat - thr) <= NEAR) & (stat != thr)  # exact zeros (ReLU) cannot flip
    return {
        "hidden/mean": h_sum / len(counted),
        "hidden/first": hidden[:, 0],
        "hidden/last": hidden[:, n - 1],
        "ffn/mean": f_sum / len(counted),
        "ffn/max": f_max,
        "ffn/absmax": f_absmax,
        "fire": fired,
        "near": near,
        "n_counted": len(counted),
    }


_REF: dict = {}


def reference(family: str, mode: str, *, max_length: int = 24, include_special: bool = False, thresholds=DEFAULT_THRESHOLDS):
    """Per-text pooled references, stacked over rows; cached per (family, mode, options)."""
    thresholds = tuple(thresholds)
    key = (family, mode, max_length, include_special, thresholds)
    if key not in _REF:
        if (family, "model") not in _REF:
            _REF[(family, "model")] = random_model(family)
        model, tokenizer = _REF[(family, "model")]
        toks = [_tokens(tokenizer, t, max_length)[:2] for t in TEXTS]
        per_text = _per_text_tokens(model, family, toks, mode, tokenizer.pad_token_id)
        pooled = [
            _pool(h, f, s, include_special=include_special, thresholds=thresholds, magnitude=MAGNITUDE[family])
            for (h, f), (_, s) in zip(per_text, toks)
        ]
        ref = {k: np.stack([p[k] for p in pooled]) for k in pooled[0]}
        ref["n_tokens"] = np.array([len(ids) for ids, _ in toks])
        ref["truncated"] = np.array([_tokens(tokenizer, t, max_length)[2] for t in TEXTS])
        _REF[key] = ref
    return _REF[key]


def assert_close(actual, expected, *, rel: float, what: str):
    """|a - e| <= rel * |e| + rel/10 * max|e| (the max taken over the whole array, a magnitude-aware atol)."""
    actual = np.asarray(actual, dtype=np.float64)
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel / 10 * scale, err_msg=what)


def assert_fire_counts(actual, expected, near, what: str):
    """Exact, except by at most the number of activations within NEAR of the threshold."""
    diff = np.abs(np.asarray(actual, dtype=np.int64) - expected)
    assert (diff <= near).all(), f"{what}: fire counts differ beyond near-threshold activations at {np.argwhere(diff > near)[:5].tolist()}"


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_the_reference(family):
    """The hand-built left- and right-padded batches agree with running each text alone (float32)."""
    single = reference(family, "single")
    for mode in ("left", "right"):
        batched = reference(family, mode)
        for name in ("hidden/mean", "hidden/first", "hidden/last", "ffn/mean", "ffn/max"):
            assert_close(batched[name], single[name], rel=1e-4, what=f"{family} {mode}-padded {name}")
        assert_fire_counts(batched["fire"], single["fire"], single["near"], f"{family} {mode}-padded")
        assert (batched["n_counted"] == single["n_counted"]).all()


def _shards(n_rows: int, shard_rows: int):
    return [(lo, min(lo + shard_rows, n_rows)) for lo in range(0, n_rows, shard_rows)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["float16", "float32", "special", "threshold"])
def test_stored_features_match_reference(tmp_path, family, variant):
    """float16 / float32 storage, special tokens in the mean, and a threshold no activation is near."""
    overrides = {"storage_dtype": "float32"} if variant == "float32" else {}
    if variant == "special":
        overrides["special_tokens_in_mean"] = True
    thresholds = DEFAULT_THRESHOLDS
    if variant == "threshold":
        probe = reference(family, "single", thresholds=CANDIDATE_THRESHOLDS)
        thresholds = tuple(t for t, n in zip(CANDIDATE_THRESHOLDS, probe["near"].sum(axis=(0, 2, 3))) if n == 0)[:3]
        assert len(thresholds) >= 2, "need two thresholds no activation is near"
    request = make_request(family, thresholds=thresholds, **overrides)
    assert request.fire_rule == ("abs_gt" if MAGNITUDE[family] else "gt")
    cfg = request.extract
    store = Store(tmp_path / "store")
    loader = CountingLoader(family)
    stats = extract_entry(request, store, loader, progress=False)
    assert stats.committed and not stats.cached and loader.calls == 1
    assert stats.rows == len(TEXTS) and stats.truncated == 1

    entry = store.open(request.key)
    shards = _shards(len(TEXTS), cfg.shard_rows)
    assert entry.n_rows == len(TEXTS) and entry.n_shards == len(shards) >= 2
    ref = reference(family, "single", include_special=cfg.special_tokens_in_mean, thresholds=thresholds)
    if variant == "threshold":
        assert ref["near"].sum() == 0, "pick thresholds no activation is near: fire counts are then compared exactly"
        for i in range(len(thresholds)):
            assert 0 < ref["fire"][:, i].sum() < ref["n_counted"].sum() * N_LAYERS * FFN

    # The setup really exercises length-grouped batching: several batches, some of mixed lengths.
    for lo, hi in shards[:2]:
        batches = plan_batches(ref["n_tokens"][lo:hi], cfg.token_budget, cfg.max_batch_size)
        assert len(batches) >= 2
        assert any(len(set(ref["n_tokens"][lo:hi][b])) > 1 for b in batches)

    rel = 1e-2 if cfg.storage_dtype == "float16" else 1e-5
    expected_shapes = {
        "hidden/mean": (N_LAYERS + 1, HIDDEN),
        "hidden/first": (N_LAYERS + 1, HIDDEN),
        "hidden/last": (N_LAYERS + 1, HIDDEN),
        "ffn/mean": (N_LAYERS, FFN),
        "ffn/max": (N_LAYERS, FFN),
    }
    if MAGNITUDE[family]:
        expected_shapes["ffn/absmax"] = (N_LAYERS, FFN)
    else:
        assert "ffn/absmax" not in entry.datasets()
    for name, shape in expected_shapes.items():
        stored = entry.array(name).compute()
        assert stored.shape == (len(TEXTS), *shape), name
        assert stored.dtype == np.dtype(cfg.storage_dtype), name
        assert_close(stored, ref[name], rel=rel, what=f"{family} {variant} {name}")

    # Special tokens: the mean differs from the default rule exactly where a text has specials.
    if variant == "special":
        default = reference(family, "single", include_special=False)
        assert (ref["n_counted"] == ref["n_tokens"]).all()
        differs = np.abs(entry.array("hidden/mean").compute()[:, -1] - default["hidden/mean"][:, -1]).max(axis=1) > 1e-3
        assert differs.any(), "including special tokens should change the mean of texts that have them"
    else:
        assert (ref["n_counted"] < ref["n_tokens"]).all()  # every tiny tokenizer adds at least one special token

    # Firing counts: per shard, summed over the shard's rows and counted tokens only.
    fire = entry.per_shard("ffn/fire_count").compute()
    assert fire.shape == (len(shards), len(thresholds), N_LAYERS, FFN) and fire.dtype == np.int64
    attrs = entry.shard_attrs("ffn/fire_count")
    for s, (lo, hi) in enumerate(shards):
        assert_fire_counts(fire[s], ref["fire"][lo:hi].sum(axis=0), ref["near"][lo:hi].sum(axis=0), f"{family} {variant} shard {s}")
        assert list(attrs[s]["thresholds"]) == list(thresholds) and attrs[s]["rule"] == request.fire_rule
        assert attrs[s]["n_tokens"] == int(ref["n_counted"][lo:hi].sum())
        assert bool(attrs[s]["special_tokens_counted"]) == cfg.special_tokens_in_mean
    if family == "t5":  # ReLU: exactly sparse, activations never negative
        assert (entry.array("ffn/max").compute() >= 0).all()

    table = entry.table()
    assert list(table.columns) == ["row", "label", "text", "n_tokens", "truncated"]
    assert table["row"].tolist() == list(range(len(TEXTS)))
    assert table["label"].tolist() == request.split.labels.tolist()
    assert table["text"].tolist() == list(TEXTS)
    assert table["n_tokens"].tolist() == ref["n_tokens"].tolist()
    assert table["truncated"].tolist() == ref["truncated"].tolist()
    assert table["truncated"].sum() == 1 and table["truncated"][LONG_ROW]
    assert table["n_tokens"][LONG_ROW] == cfg.max_length


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_features_match_padded_references(tmp_path, family):
    """float32 storage also matches the left- and right-padded batch references (pooling is position-agnostic)."""
    request = make_request(family, storage_dtype="float32", token_budget=10_000, max_batch_size=128)
    store = Store(tmp_path / "store")
    extract_entry(request, store, CountingLoader(family), progress=False)
    entry = store.open(request.key)
    for mode in ("left", "right"):
        ref = reference(family, mode)
        for name in ("hidden/mean", "hidden/first", "hidden/last", "ffn/mean", "ffn/max"):
            assert_close(entry.array(name).compute(), ref[name], rel=1e-4, what=f"{family} vs {mode}-padded {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bfloat16_matches_reference(tmp_path, family):
    """The GPU path (bf16 weights, device-side pooling) against the float32 CPU reference, loosely."""
    from stages.extract.runner import load_for_extract

    request = make_request(family, device="cuda", compute_dtype="bfloat16", storage_dtype="float32")
    assert request.key != make_request(family, storage_dtype="float32").key  # compute dtype changes the bytes
    store = Store(tmp_path)
    assert extract_entry(request, store, load_for_extract(request.model, request.spec, request.extract), progress=False).committed
    entry = store.open(request.key)
    ref = reference(family, "single")
    for name in ("hidden/mean", "hidden/first", "hidden/last", "ffn/mean", "ffn/max"):
        assert_close(entry.array(name).compute(), ref[name], rel=1e-1, what=f"{family} cuda bf16 {name}")
    assert entry.table()["n_tokens"].tolist() == ref["n_tokens"].tolist()
    assert [a["n_tokens"] for a in entry.shard_attrs("ffn/fire_count")] == [
        int(ref["n_counted"][lo:hi].sum()) for lo, hi in _shards(len(TEXTS), 5)
    ]


# The pooler block -----------------------------------------------------------------------------------
# A checkpoint with trained pooler weights (BERT's, MPNet's) gets its pooler output stored as
# ``hidden/pooler`` (LLMEmbed reads BERT's). Random-weight models never store it. The tiny models
# saved to a folder are "local" checkpoints whose safetensors hold pooler.dense.*, so they qualify.
POOLER_FAMILIES = ("bert", "mpnet")


@pytest.fixture(scope="module")
def pooler_folders(tmp_path_factory):
    """The tiny BERT and MPNet (same seed-0 weights as ``random_model``) saved with their pooler, and a
    BERT saved without one (transformers would initialise it at random: it must not be stored)."""
    from transformers import BertModel

    root = tmp_path_factory.mktemp("pooler-models")
    out = {}
    for family in POOLER_FAMILIES:
        model, tok = random_model(family)
        assert model.pooler is not None
        model.save_pretrained(root / family)
        tok.save_pretrained(root / family)
        out[family] = root / family
    model, tok = random_model("bert")
    headless = BertModel(model.config, add_pooling_layer=False)
    headless.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("pooler.")})
    headless.save_pretrained(root / "bert-no-pooler")
    tok.save_pretrained(root / "bert-no-pooler")
    out["bert-no-pooler"] = root / "bert-no-pooler"
    return out


def _pooler_reference(family: str, max_length: int = 24) -> np.ndarray:
    """tanh(W h + b) of each text's first token of the last layer, each text run alone, in float64."""
    model, tokenizer = random_model(family)
    w = model.pooler.dense.weight.detach().double().numpy()
    b = model.pooler.dense.bias.detach().double().numpy()
    rows = []
    for text in TEXTS:
        ids, _, _ = _tokens(tokenizer, text, max_length)
        x = torch.tensor([ids])
        hidden, _ = _forward(model, family, x, torch.ones_like(x))
        rows.append(np.tanh(w @ hidden[-1][0, 0] + b))
    return np.stack(rows)[:, None, :]


@pytest.mark.parametrize("family", POOLER_FAMILIES)
def test_stored_pooler_block_matches_reference(tmp_path, pooler_folders, family):
    """A checkpoint with pooler weights: ``hidden/pooler`` is tanh(W [CLS] + b) of the last layer, and every
    other block, pooling and fire count is the same as the family's brute-force reference."""
    from pipeline.models import resolve
    from stages.extract.runner import load_for_extract

    spec = resolve(str(pooler_folders[family]))
    assert spec.kind == "local" and not spec.random_init
    request = make_request(family, spec=spec, storage_dtype="float32", thresholds=DEFAULT_THRESHOLDS)
    assert request.pooler and request.key_material()["pooler"] == "pooler_output"
    store = Store(tmp_path)
    assert extract_entry(request, store, load_for_extract(request.model, request.spec, request.extract), progress=False).committed
    entry = store.open(request.key)

    stored = entry.array("hidden/pooler").compute()
    assert stored.shape == (len(TEXTS), 1, HIDDEN) and stored.dtype == np.float32
    expected = _pooler_reference(family)
    assert_close(stored, expected, rel=1e-5, what=f"{family} pooler")
    # The pooler is neither the raw [CLS] state nor tanh of the mean: a wrong hook or pooling fails.
    ref = reference(family, "single")
    for wrong in (ref["hidden/first"][:, -1:], ref["hidden/mean"][:, -1:], np.tanh(ref["hidden/mean"][:, -1:])):
        assert np.abs(stored - wrong).max() > 1e-2
    assert np.abs(stored).max() < 1.0  # tanh output

    for name in ("hidden/mean", "hidden/first", "hidden/last", "ffn/mean", "ffn/max"):
        assert_close(entry.array(name).compute(), ref[name], rel=1e-5, what=f"{family} local {name}")
    fire = entry.per_shard("ffn/fire_count").compute()
    for s, (lo, hi) in enumerate(_shards(len(TEXTS), request.extract.shard_rows)):
        assert_fire_counts(fire[s], ref["fire"][lo:hi].sum(axis=0), ref["near"][lo:hi].sum(axis=0), f"{family} local shard {s}")


def test_no_pooler_block_without_trained_pooler_weights(tmp_path, pooler_folders):
    """Random-weight models and checkpoints without pooler weights store no pooler block, and their key says so."""
    from pipeline.models import resolve
    from stages.extract.runner import load_for_extract

    for family in ("bert", "roberta", "mpnet", "llama", "t5"):
        request = make_request(family)
        assert not request.pooler and "pooler" not in request.key_material()
    store = Store(tmp_path)
    request = make_request("bert", spec=resolve(str(pooler_folders["bert-no-pooler"])), storage_dtype="float32")
    assert not request.pooler
    extract_entry(request, store, load_for_extract(request.model, request.spec, request.extract), progress=False)
    assert "hidden/pooler" not in store.open(request.key).datasets()
    tiny = make_request("bert", storage_dtype="float32")
    extract_entry(tiny, store, CountingLoader("bert"), progress=False)
    assert "hidden/pooler" not in store.open(tiny.key).datasets()
