"""Networks by name (timm-style registry) and a forward pass over one flat parameter vector.

The distiller differentiates through many student steps; keeping the student's parameters as
one flat tensor makes each SGD step a single vector op and the matching loss a single norm.
"""
from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
from torch.func import functional_call

from .errors import UserError

if TYPE_CHECKING:
    from .config import Config
    from .datasets import DatasetSpec

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(fn):
        MODELS[name] = fn
        return fn
    return wrap


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "instancenorm":  # instance norm with affine weights, as GroupNorm with one group per channel
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def default_depth(size: int) -> int:
    """3 at 32 px (and 28), 4 at 64, 5 at 128: always a 4x4 feature map (1 at 8 px)."""
    return max(1, round(math.log2(size)) - 2)


def _first_pad(size: int) -> int:
    return 3 if size == 28 else 1  # 28 px MNIST-style inputs are padded to 32 by the first conv


class FeaturesThenLinear(nn.Module):
    """`features` (set by subclasses), flattened, then one linear classifier."""

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class ConvNet(FeaturesThenLinear):
    def __init__(self, channels, num_classes, size, width=128, depth=3, norm="instancenorm"):
        super().__init__()
        self.options = {"width": width, "depth": depth}  # what a trajectory store records
        layers, c = [], channels
        for d in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=_first_pad(size) if d == 0 else 1),
                       norm_layer(norm, width), nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(_feature_dim(self.features, channels, size), num_classes)


def _feature_dim(features: nn.Module, channels: int, size: int) -> int:
    with torch.no_grad():
        try:
            return features(torch.zeros(2, channels, size, size)).flatten(1).shape[1]
        except RuntimeError:
            raise UserError(f"images of {size} px are too small for this model; pick a shallower model") from None


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm_layer(norm, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm_layer(norm, cout))
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class BasicBlockAP(nn.Module):
    """The authors' "AP" block: stride-1 convs, and downsampling by average pooling after the first
    conv's norm and ReLU (and after the shortcut's 1x1 conv, before its norm)."""

    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        pool = [nn.AvgPool2d(2)] if stride != 1 else []
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False), norm_layer(norm, cout), nn.ReLU(inplace=True), *pool,
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), norm_layer(norm, cout))
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, 1, bias=False), *pool, norm_layer(norm, cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet18(FeaturesThenLinear):
    """CIFAR-style ResNet-18. The plain variant pools globally before its Linear(512); the AP variant
    (as the authors define it) keeps the 4x4 map at 32 px and flattens it into Linear(512 * 4 * 4)."""

    def __init__(self, channels, num_classes, size, norm="instancenorm", avgpool_downsample=False):
        super().__init__()
        block = BasicBlockAP if avgpool_downsample else BasicBlock
        layers, c = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False), norm_layer(norm, 64), nn.ReLU(inplace=True)], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            for b in range(2):
                layers.append(block(c, cout, 2 if i > 0 and b == 0 else 1, norm))
                c = cout
        head = [] if avgpool_downsample else [nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*layers, *head)
        self.classifier = nn.Linear(_feature_dim(self.features, channels, size), num_classes)


class VGG11(FeaturesThenLinear):
    def __init__(self, channels, num_classes, size, norm="instancenorm"):
        super().__init__()
        layers, c = [], channels
        for i, v in enumerate([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=_first_pad(size) if i == 0 else 1),
                           norm_layer(norm, v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(_feature_dim(self.features, channels, size), num_classes)


class AlexNet(FeaturesThenLinear):
    def __init__(self, channels, num_classes, size):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 128, 5, padding=4 if size == 28 else 2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(128, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 192, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(192, 192, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.classifier = nn.Linear(_feature_dim(self.features, channels, size), num_classes)


# Factories take (channels, num_classes, size) and keyword options; create_model rejects an
# option a factory does not take, so `--model.width 64` on resnet18 is an error, not a no-op.
@register("convnet")
def _convnet(channels, num_classes, size, width=128, depth=0):
    return ConvNet(channels, num_classes, size, width, depth or default_depth(size))


@register("convnet_bn")
def _convnet_bn(channels, num_classes, size, width=128, depth=0):
    return ConvNet(channels, num_classes, size, width, depth or default_depth(size), norm="batchnorm")


@register("resnet18")
def _resnet18(channels, num_classes, size):
    return ResNet18(channels, num_classes, size)


@register("resnet18_bn")
def _resnet18_bn(channels, num_classes, size):
    return ResNet18(channels, num_classes, size, norm="batchnorm")


@register("resnet18_ap")
def _resnet18_ap(channels, num_classes, size):
    return ResNet18(channels, num_classes, size, avgpool_downsample=True)


@register("resnet18_bn_ap")
def _resnet18_bn_ap(channels, num_classes, size):
    return ResNet18(channels, num_classes, size, norm="batchnorm", avgpool_downsample=True)


@register("vgg11")
def _vgg11(channels, num_classes, size):
    return VGG11(channels, num_classes, size)


@register("alexnet")
def _alexnet(channels, num_classes, size):
    return AlexNet(channels, num_classes, size)


def model_options(name: str) -> list[str]:
    """The keyword options a registered model takes (besides channels, classes and size)."""
    return list(inspect.signature(MODELS[name]).parameters)[3:]


def create_model(name: str, channels: int, num_classes: int, size: int, **options) -> nn.Module:
    """timm-style: a registered model by name; options it does not take are an error."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    takes = model_options(name)
    ignored = sorted(set(options) - set(takes))
    if ignored:
        raise UserError(f"model {name} takes no {', '.join(ignored)} (it takes {', '.join(takes) or 'no options'}); "
                        f"drop --model.{ignored[0]} or set it to 0")
    return MODELS[name](channels, num_classes, size, **options)


def model_for(cfg: "Config", spec: "DatasetSpec", name: str | None = None) -> nn.Module:
    """The network for a dataset: cfg.model's architecture with its options, or another registered
    one (cross-architecture evaluation) with that model's defaults."""
    name = name or cfg.model.name
    options = {}
    if name == cfg.model.name:
        options = {k: v for k, v in (("width", cfg.model.width), ("depth", cfg.model.depth)) if v}
    return create_model(name, spec.channels, spec.num_classes, spec.size, **options)


class FlatModel:
    """A module's parameters as one flat vector, and a forward pass that takes that vector."""

    def __init__(self, module: nn.Module):
        self.module = module
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.num_params = sum(self.numels)

    def flatten(self) -> torch.Tensor:
        """A fresh copy (torch.cat allocates), never a view of the live parameters."""
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])

    @torch.no_grad()
    def load(self, flat: torch.Tensor) -> None:
        for p, chunk in zip(self.module.parameters(), flat.split(self.numels)):
            p.copy_(chunk.view_as(p))

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = {n: c.view(s) for n, c, s in zip(self.names, flat.split(self.numels), self.shapes)}
        return functional_call(self.module, params, (x,))
