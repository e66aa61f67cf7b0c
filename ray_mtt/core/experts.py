"""Phase 1: train expert networks on the real data and save their parameters after every epoch.

`train_expert` is the unit of work the orchestration layer (scale/experts_job.py) fans out; it
resumes from the last saved epoch, so a killed run (or a restarted Ray worker) never redoes
finished epochs. `train_experts` is the same work in one process, with torch alone.
"""
from __future__ import annotations

import socket
import time
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from .augment import DSA
from .allocator import retain_freed_memory_on
from .config import Config, ExpertConfig
from .data import Dataset, load_dataset
from .datasets import DatasetSpec
from .difficulty import DataSchedule
from .gsam import GSAM
from .models import FlatModel, model_for
from .seeds import derive_seed, seed_everything
from .train import ShuffledBatches, accuracy, train_epoch
from .trajectories import TrajectoryStore

EpochCallback = Callable[[int, int, dict], None]  # (expert index, epoch, metrics)


def store_identity(cfg: Config, spec: DatasetSpec, model: torch.nn.Module) -> dict:
    """What a trajectory store records about its experts (and what readers must match)."""
    options = getattr(model, "options", {})
    return {"dataset": spec.name, "model": cfg.model.name, "width": options.get("width"),
            "depth": options.get("depth"), "zca": cfg.data.zca,
            "val_per_class": cfg.data.val_per_class, "train_per_class": cfg.data.train_per_class,
            "num_params": FlatModel(model).num_params,
            "channels": spec.channels, "size": spec.size, "num_classes": spec.num_classes,
            "lr": cfg.experts.lr, "batch_size": cfg.experts.batch_size, "augment": cfg.augment.strategy,
            "optimizer": optimizer_identity(cfg.experts), "data_schedule": schedule_identity(cfg.experts)}


def schedule_identity(ex: ExpertConfig) -> str:
    """Which images each epoch trained on, as the store records it."""
    if ex.data_schedule == "none":
        return "none"
    removals = ",".join(f"{e}:{r:g}" for e, r in zip(ex.removal_epochs, ex.removal_ratios))
    return (f"pad(ir={ex.schedule_ir:g}, aee={ex.schedule_aee}, remove={removals}, el2n={ex.difficulty_networks}x"
            f"{ex.difficulty_epochs} epochs)")


def optimizer_identity(ex: ExpertConfig) -> str:
    """How the experts stepped, as the store records it: stores of different optimizers never mix."""
    return "sgd" if ex.optimizer == "sgd" else f"gsam(rho={ex.gsam_rho:g}, alpha={ex.gsam_alpha:g})"


def expert_optimizer(model: torch.nn.Module, ex: ExpertConfig):
    """SGD (lr, momentum, weight decay), wrapped in GSAM for flat experts."""
    sgd = torch.optim.SGD(model.parameters(), lr=ex.lr, momentum=ex.momentum, weight_decay=ex.weight_decay)
    return sgd if ex.optimizer == "sgd" else GSAM(sgd, ex.gsam_rho, ex.gsam_alpha)


def load_expert_data(cfg: Config, device: torch.device | str) -> Dataset:
    """The dataset as expert training needs it: without the training images when they stream from a .beton."""
    return load_dataset(cfg.data, device, keep_train=cfg.data.loader == "tensor")


# (order seed, the training indices to use or None for all) -> one epoch of (uint8 images, labels) minibatches
EpochBatches = Callable[..., Iterable]


def epoch_batches(cfg: Config, data: Dataset) -> EpochBatches:
    """The training split's minibatches on the device, in the order one seed fixes (each expert's
    epoch has its own stream, seeds.py), so a resumed expert sees the data it would have seen. Build
    it once per process: the FFCV loader compiles its pipeline (seconds) on first use, then serves
    every expert."""
    if cfg.data.loader == "ffcv":
        from .beton import BetonBatches, ensure_beton  # the optional ffcv extra
        spec = data.spec
        return BetonBatches(ensure_beton(cfg), cfg.experts.batch_size, data.y_train.device, len(data.y_train),
                            (spec.size, spec.size, spec.channels), cfg.data.beton_workers).epoch
    def batches(seed: int, indices: torch.Tensor | None = None) -> ShuffledBatches:
        x, y = (data.x_train, data.y_train) if indices is None else (data.x_train[indices.to(data.x_train.device)],
                                                                     data.y_train[indices.to(data.y_train.device)])
        return ShuffledBatches(x, y, cfg.experts.batch_size, torch.Generator().manual_seed(seed))
    return batches


class EpochProgress:
    """Writes how far an expert is within its epoch into the store after its first step, then at most
    every `every_s` seconds, so a driver on another node shows steps and images/s between saved
    epochs (a CIFAR-10 epoch on one CPU thread takes minutes; a Tiny ImageNet one, half an hour)."""

    def __init__(self, store: TrajectoryStore, index: int, epoch: int, steps: int, every_s: float = 10.0):
        self.store, self.index, self.epoch, self.steps, self.every_s = store, index, epoch, steps, every_s
        self.start = self.last = time.perf_counter()
        self.first_step_at = None  # wall-clock end of the epoch's first step (time to first batch)

    def __call__(self, step: int, images: int) -> None:
        now = time.perf_counter()
        if step == 1:
            self.first_step_at = time.time()
        if step == 1 or now - self.last >= self.every_s:
            self.last = now
            self.store.save_progress(self.index, {
                "epoch": self.epoch, "step": step, "steps": self.steps, "images": images,
                "images_per_s": images / (now - self.start), "worker": socket.gethostname(), "at": time.time()})


def train_expert(cfg: Config, data: Dataset, store: TrajectoryStore, index: int,
                 on_epoch: EpochCallback | None = None, progress: bool = False,
                 batches: EpochBatches | None = None) -> dict:
    """Train expert `index` for cfg.experts.epochs epochs, resuming after its last saved epoch."""
    device = data.x_train.device
    retain_freed_memory_on(device)
    seed_everything(cfg.seed, "expert_init", index)
    model = model_for(cfg, data.spec).to(device)
    flat = FlatModel(model)
    saved = store.saved_epoch_count(index)
    if saved:
        flat.load(store.load_epoch(index, saved - 1).to(device))
    else:
        store.save_epoch(index, 0, flat.flatten(), {"epoch": 0, "test_acc": None, "train_loss": None})
        saved = 1
    ex = cfg.experts
    # Momentum state is not part of a trajectory (the paper uses none); a resumed expert restarts it at zero.
    # GSAM keeps no state of its own (rho and alpha are constant), so it resumes exactly.
    optimizer = expert_optimizer(model, ex)
    augment = DSA(cfg.augment.strategy, cfg.augment.siamese)
    batches = batches or epoch_batches(cfg, data)
    schedule = DataSchedule(cfg, data) if ex.data_schedule == "pad" else None
    for epoch in range(saved, ex.epochs + 1):
        seed_everything(cfg.seed, "expert_epoch", index, epoch)  # so a resumed expert draws the same augmentations
        start = time.perf_counter()
        epoch_data = batches(derive_seed(cfg.seed, "expert_order", index, epoch),
                             None if schedule is None else schedule.indices(epoch))
        position = EpochProgress(store, index, epoch, len(epoch_data))
        loss = train_epoch(model, optimizer, epoch_data, data.preprocess, augment,
                           progress=f"expert {index} epoch {epoch}" if progress else "", on_batch=position)
        metrics = {"epoch": epoch, "train_loss": float(loss), "seconds": time.perf_counter() - start,
                   "first_step_at": position.first_step_at,
                   "test_acc": accuracy(model, data.x_test, data.y_test, data.preprocess), "saved_at": time.time()}
        store.save_epoch(index, epoch, flat.flatten(), metrics)
        if on_epoch is not None:
            on_epoch(index, epoch, metrics)
    store.finish(index, {"seed": cfg.seed, "index": index, "num_epochs": ex.epochs})
    return store.open(index).info


def train_experts(cfg: Config, data: Dataset, progress: bool = True) -> TrajectoryStore:
    """Train every expert of cfg.experts that the store does not hold yet (the local, one-process path)."""
    store = open_store_for_training(cfg, data.spec)
    todo = store.unfinished(cfg.experts.num_experts)
    bar = tqdm(total=cfg.experts.num_experts, initial=cfg.experts.num_experts - len(todo), desc="experts",
               disable=not progress)
    batches = epoch_batches(cfg, data) if todo else None
    for k in todo:
        info = train_expert(cfg, data, store, k, progress=progress, batches=batches)
        bar.update(1)
        bar.set_postfix(test_acc=f"{info['epochs'][-1]['test_acc']:.3f}")
    bar.close()
    return store


def open_store_for_training(cfg: Config, spec: DatasetSpec) -> TrajectoryStore:
    """Create the store, or check that the experts it holds were trained like cfg's."""
    store = TrajectoryStore(cfg.expert_dir)
    store.init(store_identity(cfg, spec, model_for(cfg, spec)))
    return store
