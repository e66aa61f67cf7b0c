"""The plain training loop shared by expert training and evaluation, and test accuracy."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ShuffledBatches:
    """One epoch of minibatches of tensors already on the device, in random order: the default
    loader (the GPU never waits on Python). The beton loader yields the same (images, labels)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 generator: torch.Generator | None = None):
        self.images, self.labels, self.batch_size, self.generator = images, labels, batch_size, generator

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.images), generator=self.generator).to(self.images.device)
        for batch in order.split(self.batch_size):
            yield self.images[batch], self.labels[batch]


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                to_input: Callable[[torch.Tensor], torch.Tensor], augment: Callable[[torch.Tensor], torch.Tensor],
                progress: str = "", on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """One pass over `batches` of (images, labels); returns the mean training loss as a tensor
    (no host sync, which matters in evaluation's 1000 one-step epochs on GPU). A non-empty
    `progress` shows a per-batch bar with that label; `on_batch(steps, images)` hears of each step."""
    model.train()
    sums, count = [], 0  # per-batch loss sums stay on the device
    for step, (images, labels) in enumerate(tqdm(batches, desc=progress, disable=not progress, leave=False)):
        x = augment(to_input(images))  # one draw: GSAM's second pass must see the same batch

        def closure():
            optimizer.zero_grad(set_to_none=True)
            batch_loss = F.cross_entropy(model(x), labels)
            batch_loss.backward()
            return batch_loss
        loss = optimizer.step(closure)  # SGD calls it once, GSAM twice
        sums.append(loss.detach() * len(labels))
        count += len(labels)
        if on_batch is not None:
            on_batch(step + 1, count)
    return torch.stack(sums).sum() / count if sums else torch.zeros(())


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             to_input: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 1000) -> float:
    model.eval()
    correct = torch.zeros((), device=images.device)
    for start in range(0, len(images), batch_size):
        logits = model(to_input(images[start:start + batch_size]))
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum()
    return float(correct) / max(len(images), 1)
