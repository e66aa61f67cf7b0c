"""Expert trajectories on Ray Train: one TorchTrainer run whose workers share out the experts.

Why one run for the whole job rather than one per expert: a TorchTrainer.fit() costs ~20 s of
start-up and ~1.5 GB of helper processes (ray 2.60), paid once here instead of once per expert.
The workers are gang-scheduled, so a failure restarts the whole group (FailureConfig); that is
cheap because every worker resumes its expert after the last epoch saved in the trajectory store.

Why the store, not Ray's checkpoints, holds the snapshots: a snapshot reported as a Ray checkpoint
would be a second copy of every trajectory row. Each epoch is written once, atomically, into the
store (a path or URI, the same pyarrow filesystems Ray uses). `ray.train.report` is a barrier
across workers, so the workers advance in rounds: in each round every worker trains one expert
and then reports it, and all workers report the same number of times. Reporting per expert, not
per epoch, matters for short epochs: Ray 2.60 takes one report per worker per 2 s health check.
"""
from __future__ import annotations

import socket
import threading
import time

import ray
import torch
import torch.distributed as dist
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..core.config import Config, config_from_dict
from ..core.data import read_raw
from ..core.errors import UserError
from ..core.experts import epoch_batches, load_expert_data, open_store_for_training, train_expert
from ..core.trajectories import TrajectoryStore


def check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Ray's client retries a HOST:PORT that nobody answers for minutes; a TCP connect tells in seconds."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379), 'auto' or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one there with "
                        f"`ray start --head`, or drop --address to use the local one") from None


def connect(address: str | None) -> None:
    """Join the cluster at `address`, or the one running on this machine, or start a local one."""
    check_reachable(address)
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
             configure_logging=False)


def plan_rounds(store: TrajectoryStore, cfg: Config, world: int) -> list[list[int]]:
    """The unfinished experts, in rounds of at most one expert per worker."""
    todo = store.unfinished(cfg.experts.num_experts)
    return [todo[i:i + world] for i in range(0, len(todo), world)]


def expert_worker(loop_config: dict) -> None:
    """The Ray Train worker loop: train this worker's expert of each round, resuming saved epochs."""
    cfg = config_from_dict(loop_config["config"])
    torch.set_num_threads(loop_config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    data = load_expert_data(cfg, ray.train.torch.get_device())
    store = open_store_for_training(cfg, data.spec)
    # Everyone reads the store before anyone writes to it, so all workers compute the same plan.
    rounds = plan_rounds(store, cfg, world)
    if dist.is_initialized():
        dist.barrier()
    batches = epoch_batches(cfg, data) if rounds else None
    for round_ in rounds:
        summary = {"expert": -1}  # a worker without an expert this round still reports, to pass the barrier
        if rank < len(round_):
            info = train_expert(cfg, data, store, round_[rank], batches=batches)
            summary = {"expert": round_[rank], "test_acc": info["epochs"][-1]["test_acc"],
                       "train_seconds": sum(e.get("seconds") or 0 for e in info["epochs"])}
        ray.train.report({**summary, "rank": rank})


class Progress:
    """Prints experts done / running / pending, epochs per second and an ETA, read from the store."""

    def __init__(self, store: TrajectoryStore, cfg: Config, every_s: float):
        self.store, self.cfg, self.every_s = store, cfg, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def counts(self) -> tuple[int, int, int]:
        """(finished experts, experts in training, epochs saved in total), from listings only."""
        unfinished = self.store.unfinished(self.cfg.experts.num_experts)
        saved = [n for n in map(self.store.saved_epoch_count, unfinished) if n]  # includes epoch 0, the init
        done = self.cfg.experts.num_experts - len(unfinished)
        return done, len(saved), done * self.cfg.experts.epochs + sum(n - 1 for n in saved)

    def _loop(self) -> None:
        start, (_, _, first) = time.perf_counter(), self.counts()
        total = self.cfg.experts.num_experts * self.cfg.experts.epochs
        while not self.stop.wait(self.every_s):
            done, running, epochs = self.counts()
            rate = (epochs - first) / (time.perf_counter() - start)
            eta = f"{(total - epochs) / rate / 60:.1f} min" if rate > 0 else "?"
            pending = self.cfg.experts.num_experts - done - running
            print(f"experts: {done} done, {running} running, {pending} pending | {rate:.2f} epochs/s | ETA {eta}",
                  flush=True)

    def __enter__(self) -> "Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def default_workers(cpus_per_worker: int) -> tuple[int, bool]:
    """(workers, use_gpu): one worker per GPU when the cluster has GPUs, else one per cpus_per_worker CPUs."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, True
    return max(1, int(resources.get("CPU", 1)) // cpus_per_worker), False


def run_job(cfg: Config, address: str | None = None, workers: int = 0, cpus_per_worker: int = 1,
            max_failures: int = 3, progress_every_s: float = 30.0) -> TrajectoryStore:
    """Train every expert the store lacks on the Ray cluster at `address`; returns the store."""
    _, spec, _ = read_raw(cfg.data)  # bad dataset names, paths and files fail here, before Ray starts
    store = open_store_for_training(cfg, spec)
    if cfg.data.loader == "ffcv":
        from ..core.beton import ensure_beton
        ensure_beton(cfg)  # written once here; workers on nodes that cannot see beton_dir write their own
    connect(address)
    todo = store.unfinished(cfg.experts.num_experts)
    if not todo:
        return store
    default_count, use_gpu = default_workers(cpus_per_worker)
    workers = min(workers or default_count, len(todo))
    with Progress(store, cfg, progress_every_s):
        trainer = TorchTrainer(
            expert_worker,
            train_loop_config={"config": cfg.to_dict(), "threads": cpus_per_worker},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name=f"experts_{cfg.data.dataset}_{cfg.model.name}",
                                 storage_path=f"{store.root.rstrip('/')}/_ray",  # Ray's run state, beside the trajectories
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as e:
            missing = store.unfinished(cfg.experts.num_experts)
            reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
            raise UserError(f"expert job failed after {max_failures} restarts ({reason[0]}); experts "
                            f"{missing} are unfinished: rerun the same command to resume them") from None
    return store
