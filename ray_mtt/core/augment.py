"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) with the parameters MTT uses.

Each call draws one op group from the strategy and applies it with random parameters, per image
(MTT) or shared by the whole batch (`siamese`). Sampling and applying are separate so a draw can
be replayed exactly: the constant-memory distiller recomputes each student step with the same
augmentation. Everything is differentiable w.r.t. the pixels.

The ops are written directly in torch: kornia's colour ops are HSV-based and its geometric
augmentations sample differently, so they would not reproduce DSA. Geometric ops (crop, flip,
scale, rotate) become one affine grid and one `grid_sample`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
BRIGHTNESS, SATURATION, CONTRAST = 1.0, 2.0, 0.5  # +U(-.5,.5); xU(0,2); xU(.5,1.5)
CROP_RATIO, CUTOUT_RATIO, SCALE_RATIO, ROTATE_DEG, FLIP_P = 0.125, 0.5, 1.2, 15.0, 0.5


@dataclass
class AugParams:
    op: str
    values: dict[str, torch.Tensor]


class DSA:
    def __init__(self, strategy: str = "color_crop_cutout_flip_scale_rotate", siamese: bool = False):
        self.ops = [] if strategy in ("", "none") else strategy.split("_")
        unknown = [o for o in self.ops if o not in OPS]
        if unknown:
            raise UserError(f"unknown augmentation op(s) {unknown} in {strategy!r}; known: {', '.join(OPS)} or 'none'")
        self.siamese = siamese

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        params = self.sample(x.shape[0], x.shape[-1], x.device)
        return x if params is None else apply(x, params)

    def sample(self, n: int, size: int, device, generator: torch.Generator | None = None) -> AugParams | None:
        if not self.ops:
            return None
        # The op index comes from a CPU generator so picking it never syncs with the GPU.
        op = self.ops[int(torch.randint(len(self.ops), (1,), generator=generator if generator is not None
                                        and generator.device.type == "cpu" else None))]
        draws = 1 if self.siamese else n
        gen = generator if generator is not None and generator.device == torch.device(device) else None

        def rand(*shape):
            return torch.rand(draws, *shape, device=device, generator=gen).expand(n, *shape)

        if op == "color":
            values = {"brightness": (rand(1, 1, 1) - 0.5) * BRIGHTNESS,
                      "saturation": rand(1, 1, 1) * SATURATION,
                      "contrast": rand(1, 1, 1) + CONTRAST}
        elif op == "crop":
            shift = int(size * CROP_RATIO + 0.5)
            values = {"shift": torch.floor(rand(2) * (2 * shift + 1)) - shift}  # integer pixels
        elif op == "cutout":
            values = {"center": torch.floor(rand(2) * size)}
        elif op == "flip":
            values = {"flip": rand() < FLIP_P}
        elif op == "scale":
            values = {"scale": rand(2) * (SCALE_RATIO - 1 / SCALE_RATIO) + 1 / SCALE_RATIO}
        else:
            values = {"angle": (rand() - 0.5) * 2 * math.radians(ROTATE_DEG)}
        return AugParams(op, values)


def apply(x: torch.Tensor, params: AugParams) -> torch.Tensor:
    v = params.values
    if params.op == "color":
        x = x + v["brightness"]
        x_mean = x.mean(dim=1, keepdim=True)
        x = (x - x_mean) * v["saturation"] + x_mean
        x_mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - x_mean) * v["contrast"] + x_mean
    if params.op == "cutout":
        size = x.shape[-1]
        half = int(size * CUTOUT_RATIO + 0.5) // 2
        coords = torch.arange(size, device=x.device, dtype=x.dtype)
        cy, cx = v["center"][:, 0].view(-1, 1, 1), v["center"][:, 1].view(-1, 1, 1)
        dy, dx = coords.view(1, -1, 1) - cy, coords.view(1, 1, -1) - cx
        inside = (dy >= -half) & (dy < half) & (dx >= -half) & (dx < half)  # a square of half the side
        return x * (~inside).unsqueeze(1).to(x.dtype)
    return F.grid_sample(x, F.affine_grid(_theta(params, x), list(x.shape), align_corners=False),
                         align_corners=False, padding_mode="zeros")


def _theta(params: AugParams, x: torch.Tensor) -> torch.Tensor:
    """The affine map (output coords -> input coords, normalised) of a geometric op."""
    n, size = x.shape[0], x.shape[-1]
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    v = params.values
    if params.op == "crop":  # shift by whole pixels: 2 / size per pixel in normalised coords
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, :, 2] = v["shift"].to(x.dtype) * (2.0 / size)
    elif params.op == "flip":
        theta[:, 0, 0] = 1 - 2 * v["flip"].to(x.dtype)
        theta[:, 1, 1] = 1
    elif params.op == "scale":
        theta[:, 0, 0], theta[:, 1, 1] = v["scale"][:, 0], v["scale"][:, 1]
    else:
        cos, sin = torch.cos(v["angle"]), torch.sin(v["angle"])
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, sin, -sin, cos
    return theta
