"""The plain training loop shared by expert training and evaluation, and test accuracy."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                batch_size: int, to_input: Callable[[torch.Tensor], torch.Tensor],
                augment: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator | None = None,
                progress: str = "") -> torch.Tensor:
    """One pass over (images, labels) in random order; returns the mean training loss as a tensor
    (no host sync, which matters in evaluation's 1000 one-step epochs on GPU). A non-empty
    `progress` shows a per-batch bar with that label."""
    model.train()
    order = torch.randperm(len(images), generator=generator).to(images.device)
    total, count = torch.zeros((), device=images.device), 0
    for batch in tqdm(order.split(batch_size), desc=progress, disable=not progress, leave=False):
        x = augment(to_input(images[batch]))
        loss = F.cross_entropy(model(x), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(batch)
        count += len(batch)
    return total / max(count, 1)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             to_input: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 1000) -> float:
    model.eval()
    correct = torch.zeros((), device=images.device)
    for start in range(0, len(images), batch_size):
        logits = model(to_input(images[start:start + batch_size]))
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum()
    return float(correct) / max(len(images), 1)
