"""The reference LLMEmbed head: its structure against the published shapes, its two corrections, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from stages.train.llmembed import REFERENCE_HIDDEN, LLMEmbedHead, reference_width

LLAMA = [f"llama:{i}:mean" for i in range(5)]


def _reference_param_count(llama_width: int, other_width: int, n_llama: int, n_other: int, n_classes: int) -> int:
    """Parameters of ChunLiu-cs/LLMEmbed-ACL2024 DownstreamModel, written out from its layer list."""
    m = n_llama + n_other
    compress = n_llama * (llama_width * other_width + other_width)
    fc1_in = m * m + llama_width
    return compress + fc1_in * 1024 + 1024 + 1024 * 256 + 256 + 256 * n_classes + n_classes


def test_reference_shapes_llama2_bert_roberta():
    """At the reference's widths (five 4096 llama layers, two 1024 blocks) the net is the reference's."""
    head = LLMEmbedHead()
    dims = [4096] * 5 + [1024, 1024]
    assert reference_width(dims, range(5)) == 1024
    net = head._build_net(dims, list(range(5)), 2)
    for i in range(5):
        lin, act, drop = net.compress[i]
        assert (lin.in_features, lin.out_features) == (4096, 1024)
        assert isinstance(act, nn.ReLU) and drop.p == 0.5
    assert isinstance(net.compress[5], nn.Identity) and isinstance(net.compress[6], nn.Identity)
    linears = [m for m in net.mlp if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(4145, 1024), (1024, 256), (256, 2)]
    assert [m.p for m in net.mlp if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert not any(isinstance(m, nn.Softmax) for m in net.modules())  # correction 1: logits into the loss
    assert sum(p.numel() for p in net.parameters()) == _reference_param_count(4096, 1024, 5, 2, 2)
    assert (head.lr, head.batch_size, tuple(head.hidden)) == (1e-4, 1024, REFERENCE_HIDDEN)


@pytest.fixture(scope="module")
def tiny_blocks():
    """Five 48-wide 'llama layers' and a 32-wide 'bert pooler'; the label is in the bert block."""
    rng = np.random.default_rng(0)

    def split(n):
        bert = rng.normal(size=(n, 32)).astype(np.float32)
        y = (bert[:, 0] > 0).astype(np.int64)
        blocks = {name: (rng.normal(size=(n, 48)) + 0.5 * y[:, None]).astype(np.float32) for name in LLAMA}
        blocks["bert:pooler"] = bert
        return blocks, y

    return split(256), split(128)


def test_fit_on_tiny_blocks_has_reference_structure(tiny_blocks):
    (Xtr, ytr), (Xdv, ydv) = tiny_blocks
    head = LLMEmbedHead(hidden=(64, 32), epochs=60, patience=60, lr=1e-3, batch_size=64).fit(Xtr, ytr, Xdv, ydv, avg_keys=LLAMA)
    net = head.net_
    assert reference_width([48] * 5 + [32], range(5)) == 32
    # block order is sorted by name: bert:pooler first, then the five llama layers
    assert head.block_names_ == ["bert:pooler"] + LLAMA
    assert isinstance(net.compress[0], nn.Identity)
    assert all(net.compress[i][0].in_features == 48 and net.compress[i][0].out_features == 32 for i in range(1, 6))
    assert net.mlp[0].in_features == 6 * 6 + 48  # full m x m co-occurrence + the raw llama average
    assert head.best_dev_accuracy_ > 0.8
    assert 1 <= head.best_epoch_ <= len(head.history_)  # correction 2: the best dev epoch is kept
    assert head.best_dev_accuracy_ == max(h["dev_accuracy"] for h in head.history_)
    assert head.n_params_ == sum(p.numel() for p in net.parameters())


def test_forward_matches_a_hand_computation(tiny_blocks):
    (Xtr, ytr), _ = tiny_blocks
    head = LLMEmbedHead(hidden=(8,), epochs=1, sigma=0.05).fit(Xtr, ytr, Xtr, ytr, avg_keys=LLAMA)
    net = head.net_.eval()
    xs = [torch.from_numpy(Xtr[name][:5]) for name in head.block_names_]
    with torch.no_grad():
        P = torch.stack([xs[0]] + [net.compress[i](xs[i]) for i in range(1, 6)], dim=1)
        co = 2 * torch.sigmoid(0.05 * torch.einsum("nid,njd->nij", P, P).reshape(5, 36)) - 1
        avg = sum(xs[1:]) / 5
        expected = net.mlp(torch.cat([co, avg], dim=1))
        got = net(xs)
    torch.testing.assert_close(got, expected)


def test_save_load_round_trip(tiny_blocks, tmp_path):
    (Xtr, ytr), (Xdv, ydv) = tiny_blocks
    head = LLMEmbedHead(hidden=(16, 8), epochs=3).fit(Xtr, ytr, Xdv, ydv, avg_keys=LLAMA)
    again = LLMEmbedHead.from_bytes(head.to_bytes())
    np.testing.assert_array_equal(again.predict_proba(Xdv), head.predict_proba(Xdv))
    assert list(again.hidden) == [16, 8]
    from stages.train.fusion import FusionHead

    with pytest.raises(ValueError, match="not a fusion-head"):
        FusionHead.from_bytes(head.to_bytes())


@pytest.mark.parametrize(
    ("param", "value", "allowed"),
    [("hidden", (), "non-empty sequence of ints"), ("width", -1, "an int >= 0"), ("dropout", 1.0, "[0.0, 0.95]")],
)
def test_bad_parameters_name_the_parameter(tiny_blocks, param, value, allowed):
    (Xtr, ytr), _ = tiny_blocks
    with pytest.raises(ValueError, match=rf"LLMEmbedHead: parameter {param}=.* is invalid; expected .*{__import__('re').escape(allowed)}"):
        LLMEmbedHead(**{param: value}).fit(Xtr, ytr, Xtr, ytr, avg_keys=LLAMA)
