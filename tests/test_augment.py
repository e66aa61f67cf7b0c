import pytest
import torch

from ray_mtt.core.augment import DSA, OPS, AugParams, apply
from ray_mtt.core.errors import UserError


@pytest.mark.parametrize("op", OPS)
def test_each_op_is_differentiable_and_changes_the_image(op):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16, requires_grad=True)
    params = DSA(op).sample(6, 16, "cpu")
    y = apply(x, params)
    assert y.shape == x.shape
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    if op != "flip":  # a flip may be drawn as "no flip" for every image; others always change something
        assert not torch.allclose(y, x)


@pytest.mark.parametrize("op", OPS)
def test_siamese_shares_parameters_and_replay_is_exact(op):
    torch.manual_seed(1)
    one = torch.rand(1, 3, 16, 16)
    batch = one.repeat(5, 1, 1, 1)
    params = DSA(op, siamese=True).sample(5, 16, "cpu")
    y = apply(batch, params)
    assert torch.allclose(y, y[:1].expand_as(y))  # same draw for every image
    assert torch.equal(apply(batch, params), y)  # replaying a draw gives the same output


def test_per_image_mode_draws_differ():
    torch.manual_seed(2)
    batch = torch.rand(1, 3, 16, 16).repeat(8, 1, 1, 1)
    y = apply(batch, DSA("rotate").sample(8, 16, "cpu"))
    assert not torch.allclose(y[0], y[1])


def test_crop_is_an_integer_shift_with_zero_fill():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    y = apply(x, AugParams("crop", {"shift": torch.tensor([[1.0, 0.0]])}))  # (x, y) shift of one pixel
    assert torch.allclose(y[0, 0, :, :-1], x[0, 0, :, 1:])
    assert torch.all(y[0, 0, :, -1] == 0)


def test_flip_mirrors_exactly():
    x = torch.rand(2, 3, 8, 8)
    y = apply(x, AugParams("flip", {"flip": torch.tensor([True, False])}))
    assert torch.allclose(y[0], x[0].flip(-1), atol=1e-6) and torch.allclose(y[1], x[1], atol=1e-6)


def test_unknown_op_is_rejected():
    with pytest.raises(UserError, match="unknown augmentation op"):
        DSA("color_blur")
    assert DSA("none").sample(2, 8, "cpu") is None
