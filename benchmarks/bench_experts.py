"""Expert-job throughput: experts/hour with Ray Train at 1 and 2 workers vs the plain local loop,
and Ray's overhead per expert (worker time not spent in training epochs).

    python benchmarks/bench_experts.py [--experts 8] [--epochs 4] [--width 32] [--dataset digits]
        [--data-dir DIR] [--train-per-class K] [--out benchmarks/results/experts_cpu.json]

Each configuration trains a fresh store of tiny digits experts; the local loop runs first in this
process as the baseline. Overhead = 1 - (seconds inside train epochs) / (workers x wall seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster, started and stopped here

import ray  # noqa: E402
import torch  # noqa: E402

from ray_mtt.core.config import Config  # noqa: E402
from ray_mtt.core.data import load_dataset  # noqa: E402
from ray_mtt.core.experts import train_experts  # noqa: E402
from ray_mtt.core.trajectories import TrajectoryStore  # noqa: E402
from ray_mtt.scale.experts_job import run_job  # noqa: E402
from ray_mtt.scale.options import JobResources  # noqa: E402


def small(run_dir: str, args) -> Config:
    cfg = Config(run_dir=run_dir, device="cpu")
    cfg.data.dataset, cfg.data.data_dir, cfg.data.train_per_class = args.dataset, args.data_dir, args.train_per_class
    cfg.model.width = args.width
    cfg.experts.num_experts, cfg.experts.epochs, cfg.experts.batch_size = args.experts, args.epochs, args.batch_size
    return cfg.validate().absolute_paths()


def measure(name: str, cfg: Config, workers: int, train) -> dict:
    start = time.perf_counter()
    train()
    wall = time.perf_counter() - start
    store = TrajectoryStore(cfg.expert_dir)
    train_s = sum(e["seconds"] for k in store.completed() for e in store.read_info(k)["epochs"][1:])
    row = {"engine": name, "workers": workers, "experts": len(store.completed()), "wall_s": round(wall, 1),
           "experts_per_hour": round(3600 * len(store.completed()) / wall, 1),
           "train_s": round(train_s, 1), "overhead": round(1 - train_s / (workers * wall), 3)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--train-per-class", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same one thread per expert as each Ray worker gets
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = small(f"{tmp}/local", args)
        rows.append(measure("local", cfg, 1, lambda: train_experts(cfg, load_dataset(cfg.data), progress=False)))
        ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
        for workers in (1, 2):
            cfg = small(f"{tmp}/ray{workers}", args)
            resources = JobResources(workers=workers, min_workers=workers, use_gpu="no")
            rows.append(measure("ray", cfg, workers, lambda: run_job(cfg, None, resources, progress_every_s=600)))
        ray.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps({"device": platform.processor() or platform.machine(),
                                              "cpus": os.cpu_count(), "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
