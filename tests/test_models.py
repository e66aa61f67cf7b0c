import pytest
import torch

from ray_mtt.core.errors import UserError
from ray_mtt.core.models import MODELS, FlatModel, create_model, model_options


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_and_flat_forward_matches(name):
    torch.manual_seed(0)
    options = {"width": 16} if "width" in model_options(name) else {}
    model = create_model(name, 3, 10, 32, **options).eval()
    flat = FlatModel(model)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(flat(flat.flatten(), x), model(x), atol=1e-5)


def test_convnet_sizes_match_the_paper():
    assert FlatModel(create_model("convnet", 3, 10, 32)).num_params == 320_010
    assert FlatModel(create_model("convnet", 3, 200, 64)).num_params == 857_160  # ConvNetD4, Tiny ImageNet


def test_flatten_is_a_copy_not_a_view():
    # The authors' CPU bug: snapshots aliasing live parameters make every epoch identical.
    model = create_model("convnet", 1, 10, 8, width=8)
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
        create_model("resnet50", 3, 10, 32)
    with pytest.raises(UserError, match="too small"):
        create_model("vgg11", 1, 10, 8)


def test_an_option_a_model_would_ignore_is_an_error():
    with pytest.raises(UserError, match="model resnet18 takes no width"):
        create_model("resnet18", 3, 10, 32, width=64)
    assert model_options("convnet") == ["width", "depth"] and model_options("vgg11") == []


@pytest.mark.parametrize("name, norm", [("resnet18_ap", torch.nn.GroupNorm), ("resnet18_bn_ap", torch.nn.BatchNorm2d)])
def test_resnet18_ap_is_the_authors_network(name, norm):
    """Their AP block: conv -> norm -> ReLU -> avgpool; shortcut conv1x1 -> avgpool -> norm; and a
    flat Linear over 512 x 4 x 4 features at 32 px (no global pooling)."""
    model = create_model(name, 3, 10, 32)
    assert model.classifier.in_features == 512 * 4 * 4
    down = model.features[5]  # the first block of the 128-channel stage, which downsamples
    assert [type(m) for m in down.body] == [torch.nn.Conv2d, norm, torch.nn.ReLU, torch.nn.AvgPool2d,
                                            torch.nn.Conv2d, norm]
    assert [type(m) for m in down.shortcut] == [torch.nn.Conv2d, torch.nn.AvgPool2d, norm]
    assert all(m.stride == (1, 1) for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
