"""Expert trajectories on Ray Train: one TorchTrainer run whose workers share out the experts.

The driver reads the dataset once and hands it to the workers through Ray's object store, so no
worker reads the driver's disk; trajectories go to the store (a bucket on a cluster). The worker
group is elastic (min, max): it starts once `min` workers fit and grows as nodes (GPUs) arrive.

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

import os
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray
import torch
import torch.distributed as dist
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from ..core.config import Config, config_from_dict
from ..core.data import Splits, read_splits, to_device
from ..core.errors import Interrupted, UserError
from ..core.experts import epoch_batches, open_store_for_training, train_expert
from ..core.storage import is_uri, open_storage
from ..core.trajectories import TrajectoryStore
from .cluster import connect, ray_failure, want_gpus
from .options import JobResources
from .places import autoscaler_can_add_nodes, check_shared


def publish_beton(cfg: Config, store_root: str) -> str | None:
    """Write the .beton once, here; when the store is a URI also copy it beside the trajectories
    (`<store>/_data/`), where every node fetches it: no worker can read the driver's disk."""
    from ..core.beton import ensure_beton
    path = ensure_beton(cfg)
    if not is_uri(store_root):
        return None
    uri = f"{store_root.rstrip('/')}/_data/{path.name}"
    storage = open_storage(uri.rsplit("/", 1)[0])
    if not storage.exists(path.name):
        pafs.copy_files(str(path), uri)
    return uri


def fetch_beton(uri: str, cfg: Config) -> None:
    """On a worker: copy the published .beton to this node's disk once (FFCV memory-maps a local
    file), and point the config at that copy."""
    local = Path(tempfile.gettempdir()) / "ray_mtt_beton"
    target = local / uri.rsplit("/", 1)[1]
    if not target.is_file():
        local.mkdir(parents=True, exist_ok=True)
        partial = local / f".{target.name}.{os.getpid()}.tmp"
        pafs.copy_files(uri, str(partial))
        os.replace(partial, target)  # concurrent workers of one node: each copy complete, the last one wins
    cfg.data.beton_dir = str(local)


def check_store_reachable(store: TrajectoryStore) -> None:
    """A store on a local path must be the same folder on every node (a shared mount); a node that
    cannot see it would write trajectories nobody else reads. Ask each node, in seconds. Nodes the
    autoscaler has not launched yet cannot be asked, so there a local path is refused outright."""
    if is_uri(store.root):
        return
    if autoscaler_can_add_nodes():
        check_shared({"trajectory store": store.root})
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    marker = str(Path(store.root) / "store.json")
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]  # the head too: a CPU-less head still writes
    probe = ray.remote(num_cpus=0)(os.path.isfile)
    seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                    .remote(marker) for node in nodes], timeout=120)
    if not all(seen):
        raise UserError(f"the trajectory store {store.root} is a local folder that {seen.count(False)} of "
                        f"{len(nodes)} nodes cannot see; pass --storage s3://BUCKET/PATH (or a shared mount)")


def plan_rounds(store: TrajectoryStore, cfg: Config, world: int) -> list[list[int]]:
    """The unfinished experts, in rounds of at most one expert per worker."""
    todo = store.unfinished(cfg.experts.num_experts)
    return [todo[i:i + world] for i in range(0, len(todo), world)]


def worker_device(cfg: Config) -> torch.device:
    """The GPU Ray assigned, if this process can use one; a node that declares GPUs it lacks trains on CPU."""
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return ray.train.torch.get_device()


def expert_worker(loop_config: dict) -> None:
    """The Ray Train worker loop: train this worker's expert of each round, resuming saved epochs.
    The data comes from Ray's object store (the driver read it once), never from this node's disk."""
    cfg = config_from_dict(loop_config["config"])
    torch.set_num_threads(loop_config["threads"])
    if loop_config.get("beton_uri"):
        fetch_beton(loop_config["beton_uri"], cfg)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    data = to_device(ray.get(loop_config["splits"]), worker_device(cfg))
    store = open_store_for_training(cfg, data.spec)
    # Everyone reads the store before anyone writes to it, so all workers compute the same plan.
    rounds = plan_rounds(store, cfg, world)
    if dist.is_initialized():
        dist.barrier()
    batches = epoch_batches(cfg, data) if rounds else None
    for this_round in rounds:
        summary = {"expert": -1}  # a worker without an expert this round still reports, to pass the barrier
        if rank < len(this_round):
            info = train_expert(cfg, data, store, this_round[rank], batches=batches)
            summary = {"expert": this_round[rank], "test_acc": info["epochs"][-1]["test_acc"],
                       "train_seconds": sum(e.get("seconds") or 0 for e in info["epochs"])}
        ray.train.report({**summary, "rank": rank, "world": world})


class Progress:
    """Prints, every `every_s`: experts done / running / pending, each running expert's epoch and
    step, images/s per worker and in total, and an ETA. Everything is read from the store (workers
    write their position within the epoch there), so the driver may run on any node."""

    def __init__(self, store: TrajectoryStore, cfg: Config, every_s: float, images_per_epoch: int):
        self.store, self.cfg, self.every_s, self.images_per_epoch = store, cfg, every_s, images_per_epoch
        self.rate = None  # images/s, smoothed so the ETA does not jump between polls
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def line(self) -> str:
        ex = self.cfg.experts
        unfinished = self.store.unfinished(ex.num_experts)
        done_images = (ex.num_experts - len(unfinished)) * ex.epochs * self.images_per_epoch
        running, rates = [], []
        for k in unfinished:
            saved = self.store.saved_epoch_count(k)  # includes epoch 0, the initialisation
            if not saved:
                continue
            done_images += (saved - 1) * self.images_per_epoch
            p = self.store.read_progress(k)
            if p and p["epoch"] == saved and time.time() - p["at"] < 6 * self.every_s:  # the epoch in flight
                done_images += p["images"]
                rates.append(p["images_per_s"])
                running.append(f"#{k} epoch {p['epoch']}/{ex.epochs} step {p['step']}/{p['steps']} "
                               f"{p['images_per_s']:.0f} img/s")
            else:
                running.append(f"#{k} epoch {saved}/{ex.epochs}")
        if rates:
            self.rate = sum(rates) if self.rate is None else 0.7 * self.rate + 0.3 * sum(rates)
        left = ex.num_experts * ex.epochs * self.images_per_epoch - done_images
        eta = duration(left / self.rate) if self.rate else "? (no step timed yet)"
        pending = len(unfinished) - len(running)
        total = f"{sum(rates):.0f} images/s in {len(rates)} worker(s)" if rates else "no worker reporting yet"
        return (f"experts: {ex.num_experts - len(unfinished)} done, {len(running)} running, {pending} pending | "
                f"{total} | ETA {eta}" + "".join(f"\n  {r}" for r in running))

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            print(self.line(), flush=True)

    def __enter__(self) -> "Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def duration(seconds: float) -> str:
    """A span as a person reads it: 45 s, 12 min, 5.5 h, 137 days."""
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def interrupted(store: TrajectoryStore, cfg: Config) -> Interrupted:
    """The line for a job stopped early: what the store holds now, and how to go on."""
    unfinished = store.unfinished(cfg.experts.num_experts)
    partial = {k: store.saved_epoch_count(k) - 1 for k in unfinished if store.saved_epoch_count(k) > 1}
    parts = ", ".join(f"#{k} {e}/{cfg.experts.epochs} epochs" for k, e in sorted(partial.items())[:8])
    more = f" (+{len(partial) - 8} more)" if len(partial) > 8 else ""
    return Interrupted(f"{cfg.experts.num_experts - len(unfinished)} of {cfg.experts.num_experts} experts complete"
                       + (f", partial: {parts}{more}" if partial else "")
                       + f", saved in {store.root}; rerun the same command to resume (saved epochs are not redone)")


def scaling_config(resources: JobResources, unfinished: int) -> ScalingConfig:
    """Ray Train's elastic worker group for the experts still to train."""
    use_gpu = want_gpus(resources.use_gpu)
    most = min(resources.workers or unfinished, unfinished)
    least = max(1, min(resources.min_workers, most))
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if use_gpu else {})}
    return ScalingConfig(num_workers=(least, most) if most > least else most, use_gpu=use_gpu,
                         resources_per_worker=per_worker, elastic_resize_monitor_interval_s=resources.resize_check_s)


def run_job(cfg: Config, address: str | None = None, resources: JobResources | None = None,
            progress_every_s: float = 30.0, splits: Splits | None = None) -> TrajectoryStore:
    """Train every expert the store lacks on the Ray cluster at `address` (with `splits`, when the
    caller has read them already); returns the store."""
    resources = resources or JobResources()
    # The driver reads the data once (bad names, paths and files fail here, before Ray starts);
    # workers get it through Ray's object store.
    start = time.perf_counter()
    splits = splits or read_splits(cfg.data, keep_train=cfg.data.loader == "tensor")
    print(f"data: {cfg.data.dataset} read once by the driver in {time.perf_counter() - start:.1f} s "
          f"({splits.nbytes / 2**20:.1f} MiB); workers get it through Ray's object store", flush=True)
    store = open_store_for_training(cfg, splits.spec)
    beton_uri = publish_beton(cfg, store.root) if cfg.data.loader == "ffcv" else None
    connect(address)
    check_store_reachable(store)
    todo = store.unfinished(cfg.experts.num_experts)
    if not todo:
        return store
    scaling = scaling_config(resources, len(todo))
    with Progress(store, cfg, progress_every_s, len(splits.y_train)):
        trainer = TorchTrainer(
            expert_worker,
            train_loop_config={"config": cfg.to_dict(), "threads": max(1, int(resources.cpus_per_worker)),
                               "splits": ray.put(splits), "beton_uri": beton_uri},
            torch_config=TorchConfig(backend="gloo"),  # only a barrier crosses workers; gloo runs everywhere
            scaling_config=scaling,
            run_config=RunConfig(name=f"experts_{cfg.data.dataset}_{cfg.model.name}",
                                 storage_path=f"{store.root.rstrip('/')}/_ray",  # Ray's run state, beside the trajectories
                                 failure_config=FailureConfig(max_failures=resources.max_failures)),
        )
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as e:
            missing = store.unfinished(cfg.experts.num_experts)
            reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
            raise UserError(f"expert job failed after {resources.max_failures} restarts ({reason[0]}); experts "
                            f"{missing} are unfinished: rerun the same command to resume them") from None
        except ray.exceptions.RayError as e:
            raise ray_failure(e, "the expert job") from None
        except (KeyboardInterrupt, SystemExit):  # Ray Train's own Ctrl-C handler aborts the run and exits
            raise interrupted(store, cfg) from None
    if store.unfinished(cfg.experts.num_experts):  # fit() also returns after an abort
        raise interrupted(store, cfg)
    return store
