"""PAD's expert data (Li et al. 2024): EL2N difficulty of every training image, and the schedule of
which images an expert trains on at each epoch.

EL2N(x, y) = || softmax(f(x)) - onehot(y) ||_2, averaged over a few networks each trained briefly as
an expert is (its own seed stream); low is easy. The scores live in the trajectory store
(`difficulty/`): one file per scoring network (a killed job keeps the finished ones) and their mean,
written once, atomically, by the storage layer. The schedule, for expert epoch e (0-based):
  e <= AEE                         the easiest floor(p * n_c) images of each class, p = min(1, IR + (1 - IR) e / AEE)
  AEE < e <= removal_epochs[0]     every image
  e > removal_epochs[i]            all but the easiest floor(removal_ratios[i] * n_c) of each class
n_c is each class's own count, so it works for 5,000 images per class (CIFAR-10) as for 500
(CIFAR-100, Tiny ImageNet), unlike PAD's buffer_CL.py, which assumes 5,000.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from .augment import DSA
from .config import Config, ExpertConfig
from .data import Dataset
from .errors import UserError
from .models import model_for
from .seeds import derive_seed, seed_everything
from .storage import Storage, open_storage
from .train import train_epoch

SCORES = "difficulty/el2n.npy"


def network_file(k: int) -> str:
    return f"difficulty/el2n_net{k:03d}.npy"


@torch.no_grad()
def el2n(model: torch.nn.Module, data: Dataset, batch: int = 1000) -> np.ndarray:
    """EL2N of every training image under `model` (no augmentation), float32 (N,)."""
    model.eval()
    scores = []
    for start in range(0, len(data.y_train), batch):
        x, y = data.x_train[start:start + batch], data.y_train[start:start + batch]
        probs = F.softmax(model(data.preprocess(x)), 1)
        scores.append((probs - F.one_hot(y, data.num_classes).float()).norm(dim=1))
    return torch.cat(scores).cpu().numpy().astype(np.float32)


def network_scores(cfg: Config, data: Dataset, k: int, batches) -> np.ndarray:
    """Train scoring network k for experts.difficulty_epochs epochs as an expert trains (SGD, DSA),
    from its own streams, then score every training image."""
    ex = cfg.experts
    seed_everything(cfg.seed, "difficulty_init", k)
    model = model_for(cfg, data.spec).to(data.x_train.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=ex.lr, momentum=ex.momentum, weight_decay=ex.weight_decay)
    augment = DSA(cfg.augment.strategy, cfg.augment.siamese)
    for epoch in range(1, ex.difficulty_epochs + 1):
        seed_everything(cfg.seed, "difficulty_epoch", k, epoch)
        train_epoch(model, optimizer, batches(derive_seed(cfg.seed, "difficulty_order", k, epoch)), data.preprocess,
                    augment)
    return el2n(model, data)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def read_npy(storage: Storage, name: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read(name)))


def missing_networks(storage: Storage, ex: ExpertConfig) -> list[int]:
    return [k for k in range(ex.difficulty_networks) if not storage.exists(network_file(k))]


def finish_scores(storage: Storage, ex: ExpertConfig) -> np.ndarray:
    """The mean over the scoring networks, written once as difficulty/el2n.npy."""
    scores = np.mean([read_npy(storage, network_file(k)) for k in range(ex.difficulty_networks)], axis=0)
    storage.write(SCORES, npy(scores.astype(np.float32)))
    return scores


def score_locally(cfg: Config, data: Dataset, batches) -> np.ndarray:
    """Every scoring network the store lacks, in this process; then the mean (kept when it exists)."""
    storage = open_storage(cfg.expert_dir)
    if storage.exists(SCORES):
        return read_npy(storage, SCORES)
    for k in missing_networks(storage, cfg.experts):
        storage.write(network_file(k), npy(network_scores(cfg, data, k, batches)))
    return finish_scores(storage, cfg.experts)


def class_orders(scores: np.ndarray, labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Each class's training indices, easiest (lowest EL2N) first; ties keep index order."""
    labels = labels.cpu()
    orders = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        orders.append(idx[torch.from_numpy(np.argsort(scores[idx.numpy()], kind="stable"))])
    return orders


def scheduled_indices(orders: list[torch.Tensor], epoch: int, ex: ExpertConfig) -> torch.Tensor:
    """The training indices expert epoch `epoch` (0-based) trains on, class by class."""
    kept = []
    for order in orders:
        n = len(order)
        if epoch <= ex.schedule_aee:
            share = min(1.0, ex.schedule_ir + (1 - ex.schedule_ir) * epoch / ex.schedule_aee)
            kept.append(order[:int(share * n)])
        else:
            dropped = max([r for e, r in zip(ex.removal_epochs, ex.removal_ratios) if epoch > e], default=0.0)
            kept.append(order[int(dropped * n):])
    return torch.cat(kept)


class DataSchedule:
    """What each epoch of an expert trains on, from the store's EL2N scores (None: everything)."""

    def __init__(self, cfg: Config, data: Dataset):
        storage = open_storage(cfg.expert_dir)
        if not storage.exists(SCORES):
            raise UserError(f"experts.data_schedule pad needs EL2N scores in {cfg.expert_dir}/{SCORES}; run "
                            f"`python -m ray_mtt.difficulty` with the same flags first (the experts command does)")
        scores = read_npy(storage, SCORES)
        if len(scores) != len(data.y_train):
            raise UserError(f"{cfg.expert_dir}/{SCORES} scores {len(scores)} images but the training split holds "
                            f"{len(data.y_train)}; delete difficulty/ and rescore")
        self.ex, self.orders = cfg.experts, class_orders(scores, data.y_train, data.num_classes)

    def indices(self, epoch: int) -> torch.Tensor:
        """The indices of trajectory epoch `epoch` (1-based: snapshot `epoch` follows it)."""
        return scheduled_indices(self.orders, epoch - 1, self.ex)
