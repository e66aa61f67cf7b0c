"""DATM's additions to the distiller (Guo et al., ICLR 2024), as options of the one loop in distill.py.

  window        the start epoch is drawn from {T-, ..., UB - 1}, where the upper bound UB grows from T
                to T+ over E iterations ("sequential generation"): early iterations match the easy,
                early part of the trajectories, later ones the harder, later part.
  init correct  per class, the first ipc real images (in a seeded random order) that an expert's
                final snapshot classifies correctly; when a class runs out, the next expert scans
                what is left.
  soft labels   one learnable logit vector per image, initialised to the mean final-snapshot logits
                of the experts that classify that image correctly (all experts where none does);
                the student and the evaluation networks train on softmax(logits).
"""
from __future__ import annotations

from typing import Iterable

import torch

from .config import DistillConfig
from .data import Dataset
from .errors import UserError
from .models import FlatModel

SCAN_BATCH = 256  # real images per forward pass of an expert, as DATM scans them


def start_window(d: DistillConfig, iteration: int) -> tuple[int, int]:
    """The start epochs an iteration draws from, as range(low, high): [T-, UB) with UB growing from T to T+."""
    if not d.first_max_start_epoch:
        return d.min_start_epoch, d.max_start_epoch
    grown = (d.max_start_epoch - d.first_max_start_epoch) * iteration // d.expansion_iterations
    return d.min_start_epoch, min(d.first_max_start_epoch + grown, d.max_start_epoch)


@torch.no_grad()
def predictions(student: FlatModel, params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Logits of the network `params` on network-input images, in batches (no graph)."""
    student.module.eval()
    try:
        return torch.cat([student(params, chunk) for chunk in images.split(SCAN_BATCH)])
    finally:
        student.module.train()


def correctly_classified(data: Dataset, ipc: int, student: FlatModel, finals: Iterable[torch.Tensor],
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, the first ipc training images of a seeded order that an expert classifies correctly
    (uint8, with their labels); the experts' final snapshots are tried in turn, each on what is left."""
    orders = [torch.nonzero(data.y_train == c).flatten() for c in range(data.num_classes)]
    orders = [idx[torch.randperm(len(idx), generator=generator).to(idx.device)] for idx in orders]
    chosen: list[list[torch.Tensor]] = [[] for _ in orders]
    need = [ipc] * len(orders)
    for params in finals:
        for c, order in enumerate(orders):
            for batch in order.split(SCAN_BATCH):
                if need[c] == 0:
                    break
                right = batch[predictions(student, params, data.preprocess(data.x_train[batch])).argmax(1) == c]
                chosen[c].append(right[:need[c]])
                need[c] -= len(chosen[c][-1])
            taken = torch.cat(chosen[c]) if chosen[c] else order[:0]
            orders[c] = order[~torch.isin(order, taken)]  # the next expert scans only what is left
        if not any(need):
            break
    short = [(c, ipc - n) for c, n in enumerate(need) if n]
    if short:
        c, found = short[0]
        raise UserError(f"distill.init correct: the experts classify only {found} of class {c}'s training images "
                        f"correctly, fewer than ipc={ipc}; use --distill.init real or train the experts longer")
    idx = torch.cat([torch.cat(parts) for parts in chosen])
    return data.x_train[idx], data.y_train[idx]


def initial_label_logits(images: torch.Tensor, labels: torch.Tensor, student: FlatModel,
                         finals: Iterable[torch.Tensor]) -> torch.Tensor:
    """Per image, the mean logits of the experts whose final snapshot classifies it correctly (raw
    logits: no softmax, no temperature); the mean over all experts for an image none gets right."""
    right_sum = all_sum = None
    right_count = torch.zeros(len(images), device=images.device)
    count = 0
    for params in finals:
        logits = predictions(student, params, images)
        right = (logits.argmax(1) == labels).float()
        right_sum = logits * right[:, None] if right_sum is None else right_sum + logits * right[:, None]
        all_sum = logits if all_sum is None else all_sum + logits
        right_count += right
        count += 1
    if count == 0:
        raise UserError("soft labels need at least one finished expert to initialise them")
    return torch.where(right_count[:, None] > 0, right_sum / right_count.clamp(min=1)[:, None], all_sum / count)


def label_entropy(logits: torch.Tensor) -> float:
    """Mean entropy (nats) of softmax(logits) over the images: log(classes) is uniform, 0 is one-hot."""
    return float(-(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean())


