import pytest
import torch

from ray_mtt.errors import UserError
from ray_mtt.models import MODELS, FlatModel, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_and_flat_forward_matches(name):
    torch.manual_seed(0)
    model = build_model(name, 3, 10, 32, width=16).eval()
    flat = FlatModel(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(flat(flat.flatten(), x), model(x), atol=1e-5)


def test_convnet_sizes_match_the_paper():
    assert FlatModel(build_model("convnet", 3, 10, 32)).num_params == 320_010
    assert FlatModel(build_model("convnet", 3, 200, 64)).num_params == 857_160  # ConvNetD4, Tiny ImageNet


def test_flatten_is_a_copy_not_a_view():
    # The authors' CPU bug: snapshots aliasing live parameters make every epoch identical.
    model = build_model("convnet", 1, 10, 8, width=8)
    flat = FlatModel(model)
    snapshot = flat.flatten()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not torch.allclose(snapshot, flat.flatten())
    flat.load(snapshot)
    assert torch.equal(snapshot, flat.flatten())


def test_unknown_model_and_too_small_images():
    with pytest.raises(UserError, match="unknown model 'resnet50'; known: alexnet"):
        build_model("resnet50", 3, 10, 32)
    with pytest.raises(UserError, match="too small"):
        build_model("vgg11", 1, 10, 8)
