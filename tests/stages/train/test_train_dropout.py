import pytest
import torch
from torch import nn

from stages.train.dropout import Dropout


def _run(layer: nn.Module, x: torch.Tensor, seed: int):
    """Output, input gradient and the generator's next draw after one training-mode call."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    out = layer.train()(x)
    (out * torch.arange(out.numel(), dtype=x.dtype).view(out.shape)).sum().backward()
    return out.detach(), x.grad, torch.rand(3)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.95])
@pytest.mark.parametrize("shape", [(7, 13), (1024, 768), (3, 4, 5)])
def test_dropout_draws_nn_dropouts_cpu_masks_bit_for_bit(p, shape):
    x = torch.randn(shape)
    ours = _run(Dropout(p), x, seed=3)
    reference = _run(nn.Dropout(p), x, seed=3)
    for a, b in zip(ours, reference):
        assert torch.equal(a, b)


def test_dropout_masks_change_with_the_seed_and_drop_a_fraction_p():
    x = torch.ones(1000, 1000)
    first, second = _run(Dropout(0.3), x, seed=0)[0], _run(Dropout(0.3), x, seed=1)[0]
    assert not torch.equal(first, second)
    assert abs((first == 0).double().mean().item() - 0.3) < 0.003  # about 7 standard deviations
    assert torch.allclose(first[first != 0], torch.tensor(1 / 0.7))


def test_dropout_is_nn_dropout_in_eval_mode_at_p_zero_and_in_place():
    x = torch.randn(5, 6)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert isinstance(Dropout(0.5), nn.Dropout)
    assert Dropout(0.5).state_dict() == nn.Dropout(0.5).state_dict() == {}
    outs = []
    for layer in (Dropout(0.5, inplace=True), nn.Dropout(0.5, inplace=True)):
        torch.manual_seed(2)
        y = x.clone()
        assert layer.train()(y) is y
        outs.append(y)
    assert torch.equal(*outs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dropout_on_cuda_drops_with_nn_dropouts_kernel():
    x = torch.ones(256, 256, device="cuda")
    torch.manual_seed(0)
    ours = Dropout(0.5).train()(x)
    torch.manual_seed(0)
    assert torch.equal(ours, nn.Dropout(0.5).train()(x))
