"""Phase 1: train expert networks on the real data and save their parameters after every epoch.

`train_expert` is the unit of work the orchestration layer fans out; it resumes from the last
saved epoch, so a killed run (or a restarted Ray worker) never redoes finished epochs.

`python -m ray_mtt.experts --dataset cifar10 --num-experts 100 --epochs 50 [--storage PATH_OR_URI]`
runs on Ray Train (experts_job.py): on the cluster this machine belongs to, or on a local one.
`--engine local` trains in this process with torch alone. Rerunning the same command skips
finished experts and resumes partial ones.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from .augment import DSA
from .config import Config, add_config_args, config_from_args
from .data import Dataset, DatasetSpec, load_dataset
from .errors import UserError, run_cli
from .models import FlatModel, build_model, default_depth
from .train import ShuffledBatches, accuracy, resolve_device, train_epoch
from .trajectories import TrajectoryStore

EpochCallback = Callable[[int, int, dict], None]  # (expert index, epoch, metrics)


def store_identity(cfg: Config, spec: DatasetSpec, num_params: int) -> dict:
    """What a trajectory store records about its experts (and what readers must match)."""
    return {"dataset": spec.name, "model": cfg.model.name, "width": cfg.model.width,
            "depth": cfg.model.depth or default_depth(spec.size), "zca": cfg.data.zca,
            "val_per_class": cfg.data.val_per_class, "train_per_class": cfg.data.train_per_class,
            "num_params": num_params,
            "channels": spec.channels, "size": spec.size, "num_classes": spec.num_classes,
            "lr": cfg.experts.lr, "batch_size": cfg.experts.batch_size, "augment": cfg.augment.strategy}


def build_expert_model(cfg: Config, spec: DatasetSpec) -> torch.nn.Module:
    return build_model(cfg.model.name, spec.channels, spec.num_classes, spec.size, cfg.model.width, cfg.model.depth)


def expert_seed(cfg: Config, index: int) -> int:
    return cfg.seed * 1_000_003 + index


def load_expert_data(cfg: Config, device: torch.device | str) -> Dataset:
    """The dataset as expert training needs it: without the training images when they stream from a .beton."""
    return load_dataset(cfg.data, device, keep_train=cfg.data.loader == "tensor")


EpochBatches = Callable[[int, int], Iterable]  # (seed, epoch) -> that epoch's (uint8 images, labels) minibatches


def epoch_batches(cfg: Config, data: Dataset) -> EpochBatches:
    """The training split's minibatches on the device, in an order fixed by (seed, epoch), so a
    resumed expert sees the data it would have seen. Build it once per process: the FFCV loader
    compiles its pipeline (seconds) on first use, then serves every expert."""
    if cfg.data.loader == "ffcv":
        from .beton import BetonBatches, ensure_beton  # the optional ffcv extra
        spec = data.spec
        return BetonBatches(ensure_beton(cfg), cfg.experts.batch_size, data.y_train.device, len(data.y_train),
                            (spec.size, spec.size, spec.channels), cfg.data.beton_workers).epoch
    return lambda seed, epoch: ShuffledBatches(data.x_train, data.y_train, cfg.experts.batch_size,
                                               torch.Generator().manual_seed(seed + epoch))


def train_expert(cfg: Config, data: Dataset, store: TrajectoryStore, index: int,
                 on_epoch: EpochCallback | None = None, progress: bool = False,
                 batches: EpochBatches | None = None) -> dict:
    """Train expert `index` for cfg.experts.epochs epochs, resuming after its last saved epoch."""
    device = data.x_train.device
    seed = expert_seed(cfg, index)
    torch.manual_seed(seed)
    model = build_expert_model(cfg, data.spec).to(device)
    flat = FlatModel(model)
    saved = store.saved_epoch_count(index)
    if saved:
        flat.load(store.load_epoch(index, saved - 1).to(device))
    else:
        store.save_epoch(index, 0, flat.flatten(), {"epoch": 0, "test_acc": None, "train_loss": None})
        saved = 1
    ex = cfg.experts
    # Momentum state is not part of a trajectory (the paper uses none); a resumed expert restarts it at zero.
    optimizer = torch.optim.SGD(model.parameters(), lr=ex.lr, momentum=ex.momentum, weight_decay=ex.weight_decay)
    augment = DSA(cfg.augment.strategy, cfg.augment.siamese)
    batches = batches or epoch_batches(cfg, data)
    for epoch in range(saved, ex.epochs + 1):
        torch.manual_seed(seed * 1000 + epoch)  # so a resumed expert also draws the same augmentations
        start = time.perf_counter()
        loss = train_epoch(model, optimizer, batches(seed * 1000, epoch), data.preprocess, augment,
                           progress=f"expert {index} epoch {epoch}" if progress else "")
        metrics = {"epoch": epoch, "train_loss": float(loss), "seconds": time.perf_counter() - start,
                   "test_acc": accuracy(model, data.x_test, data.y_test, data.preprocess), "saved_at": time.time()}
        store.save_epoch(index, epoch, flat.flatten(), metrics)
        if on_epoch is not None:
            on_epoch(index, epoch, metrics)
    store.finish(index, {"seed": seed, "num_epochs": ex.epochs})
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
    num_params = FlatModel(build_expert_model(cfg, spec)).num_params
    store.init(store_identity(cfg, spec, num_params))
    return store


def add_job_args(parser: argparse.ArgumentParser) -> None:
    """Flags that choose where experts train: Ray Train workers (experts_job.py) or this process."""
    job = parser.add_argument_group("expert job")
    has_ray = importlib.util.find_spec("ray") is not None
    job.add_argument("--engine", choices=("ray", "local"), default="ray" if has_ray else "local",
                     help="ray: Ray Train workers (default when ray is installed); local: this process, torch only")
    job.add_argument("--address", help="Ray cluster address (default: the one running here, else a new local one)")
    job.add_argument("--workers", type=int, default=0, help="Ray Train workers (default: one per GPU, else per CPU)")
    job.add_argument("--cpus-per-worker", type=int, default=1)
    job.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before the job gives up")


def make_experts(cfg: Config, args: argparse.Namespace, data: Dataset | None = None,
                 progress: bool = True) -> TrajectoryStore:
    """Train the experts the store lacks with the engine that `add_job_args` flags chose."""
    if args.engine == "ray":
        if importlib.util.find_spec("ray") is None:
            raise UserError("--engine ray needs ray (pip install 'ray[train]'); or pass --engine local")
        from .experts_job import run_job  # the orchestration layer, imported only when asked for
        return run_job(cfg.absolute_paths(), args.address, args.workers, args.cpus_per_worker, args.max_failures)
    return train_experts(cfg, data or load_expert_data(cfg, resolve_device(cfg.device)), progress=progress)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_mtt.experts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    short = parser.add_argument_group("short forms")
    short.add_argument("--num-experts", dest="experts.num_experts", default=argparse.SUPPRESS,
                       help="short for --experts.num_experts")
    short.add_argument("--epochs", dest="experts.epochs", default=argparse.SUPPRESS, help="short for --experts.epochs")
    short.add_argument("--storage", dest="experts.dir", default=argparse.SUPPRESS,
                       help="trajectory store: a path (shared on a cluster) or a URI such as s3://bucket/experts")
    add_job_args(parser)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    start = time.perf_counter()
    store = make_experts(cfg, args)
    accs = [store.open(k).info["epochs"][-1]["test_acc"] for k in store.completed()]
    print(f"{len(accs)} experts in {store.root} ({time.perf_counter() - start:.0f} s); "
          f"final test accuracy {sum(accs) / len(accs):.3f} mean over experts")


if __name__ == "__main__":
    run_cli(main)
