"""GSAM (Zhuang et al. 2022) with ASAM's adaptive perturbation: FTD's flat experts (Du et al. 2023).

One step on one (augmented) batch, two forward/backward passes:
  g   = grad L(w)
  e   = rho * w^2 * g / || |w| * g ||          (adaptive perturbation, one norm over all parameters)
  g_p = grad L(w + e)
  g_v = g - cos(g, g_p) * ||g|| * g_p / ||g_p||   (the part of g orthogonal to g_p)
  w  <- base step with the gradient g_p - alpha * g_v
rho and alpha are constant (FTD: rho 0.01, alpha 0.3 for CIFAR-10).
"""
from __future__ import annotations

from typing import Callable

import torch

EPS = 1e-12


class GSAM:
    """Wraps a base optimizer (SGD for experts); `step(closure)` runs the closure twice."""

    def __init__(self, base: torch.optim.Optimizer, rho: float, alpha: float):
        self.base, self.rho, self.alpha = base, rho, alpha

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for group in self.base.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`closure` zeroes the gradients, computes the loss on the batch and calls backward."""
        with torch.enable_grad():
            loss = closure()
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad.clone() for p in params]
        scale = self.rho / (_norm(p.abs() * g for p, g in zip(params, grads)) + EPS)
        perturbation = [p.pow(2) * g * scale for p, g in zip(params, grads)]
        for p, e in zip(params, perturbation):
            p.add_(e)
        with torch.enable_grad():
            closure()
        for p, e in zip(params, perturbation):
            p.sub_(e)
        perturbed = [p.grad for p in params]
        g_norm, gp_norm = _norm(grads), _norm(perturbed)
        cosine = sum((g * gp).sum() for g, gp in zip(grads, perturbed)) / (g_norm * gp_norm + EPS)
        for p, g, gp in zip(params, grads, perturbed):
            vertical = g - cosine * g_norm * gp / (gp_norm + EPS)
            p.grad = gp - self.alpha * vertical
        self.base.step()
        return loss


def _norm(tensors) -> torch.Tensor:
    return torch.stack([t.norm() for t in tensors]).norm()
