"""Seconds from an expert job's start to the first training step on a worker node that cannot see
the driver's disk, for the chosen data path (the driver reads the files once; workers get the
arrays through Ray's object store). Runs on the test bed of tests/cluster_bed.py: a Ray head plus
one worker node in its own mount namespace (root), trajectories in a moto S3 bucket on loopback.

    python benchmarks/bench_first_batch.py --data-dir ../shared/data               # CIFAR-10 (.npz)
    python benchmarks/bench_first_batch.py --tiny-imagenet                         # writes a synthetic
                                                                                   # tiny-imagenet-200/ first
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.cluster_bed import BUCKET, S3Endpoint, SharedNothingCluster, use_token_auth  # noqa: E402

use_token_auth()  # the bed runs token auth; Ray reads the mode when it is first imported (below)


def write_tiny_imagenet(root: Path, train_per_class: int = 500, classes: int = 200, val: int = 10_000) -> Path:
    """The official tiny-imagenet-200/ layout with random 64x64 JPEGs (timing needs the files, not the pictures)."""
    from PIL import Image
    folder, rng = root / "tiny-imagenet-200", np.random.default_rng(0)
    wnids = [f"n{i:08d}" for i in range(classes)]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids))
    pixels = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(64)]
    for c, w in enumerate(wnids):
        (folder / "train" / w / "images").mkdir(parents=True)
        for k in range(train_per_class):
            pixels[(c + k) % 64].save(folder / "train" / w / "images" / f"{w}_{k}.JPEG")
    lines = []
    for k in range(val):
        pixels[k % 64].save(folder / "val" / "images" / f"val_{k}.JPEG")
        lines.append(f"val_{k}.JPEG\t{wnids[k % classes]}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines))
    return root


def first_batch_seconds(dataset: str, data_dir: Path, workdir: Path) -> dict:
    from ray_mtt.core.config import Config
    from ray_mtt.core.trajectories import TrajectoryStore
    from ray_mtt.scale.experts_job import run_job
    from ray_mtt.scale.options import JobResources
    s3 = S3Endpoint()
    os.environ.update(s3.env)
    bed = SharedNothingCluster(workdir, hidden=[data_dir], env=s3.env)
    try:
        bed.add_worker(cpus=2)
        cfg = Config(run_dir=str(workdir / "runs"), device="cpu")
        cfg.data.dataset, cfg.data.data_dir = dataset, str(data_dir)
        cfg.model.width, cfg.experts.num_experts, cfg.experts.epochs = 8, 1, 1
        cfg.experts.dir = f"s3://{BUCKET}/{dataset}"
        from ray_mtt.core.data import read_splits
        t0 = time.time()
        nbytes = read_splits(cfg.data).nbytes  # the driver's share, timed on its own (run_job reads again)
        read_s = time.time() - t0
        start = time.time()
        run_job(cfg.validate().absolute_paths(), bed.address, JobResources(workers=1, use_gpu="no"),
                progress_every_s=3600)
        first = TrajectoryStore(cfg.experts.dir).open(0).info["epochs"][1]
        return {"dataset": dataset, "driver_read_seconds": read_s, "data_mib": nbytes / 2**20,
                "seconds_to_first_step": first["first_step_at"] - start, "job_seconds": time.time() - start}
    finally:
        bed.shutdown()
        s3.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="a folder holding cifar10.npz (or cifar-10-batches-py/)")
    parser.add_argument("--tiny-imagenet", action="store_true", help="time a synthetic tiny-imagenet-200/ instead")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.tiny_imagenet:
            t0 = time.time()
            data_dir = write_tiny_imagenet(tmp / "data")
            print(f"wrote tiny-imagenet-200/ (110,000 JPEGs) in {time.time() - t0:.0f} s", flush=True)
            dataset = "tiny_imagenet"
        else:
            data_dir = tmp / "data"
            data_dir.mkdir()
            os.symlink(Path(args.data_dir).resolve() / "cifar10.npz", data_dir / "cifar10.npz")
            dataset = "cifar10"
        result = first_batch_seconds(dataset, data_dir, tmp)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
