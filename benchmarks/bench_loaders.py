"""Expert-training loaders on the same data: images/s of the default tensor loader vs FFCV .beton
files (raw pixels and JPEG), alone and inside expert training epochs.

    python benchmarks/bench_loaders.py --data-dir DIR [--dataset cifar10] [--repeats 5]
        [--train-per-class 500] [--width 32] [--out benchmarks/results/loaders_cifar10_cpu.json]

"load": one epoch of the training split in shuffled minibatches, on the device and turned into the
float network input (preprocess), i.e. everything the GPU would wait on. "train": expert training
epochs (DSA + ConvNet forward/backward/step) on the first --train-per-class images per class.
Each variant gets one warmup epoch (FFCV compiles its pipeline, the page cache fills), then the
variants run interleaved, --repeats epochs each; the figure is the median, +- half the range.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ray_mtt.core.augment import DSA
from ray_mtt.core.beton import beton_file, write_beton
from ray_mtt.core.config import Config
from ray_mtt.core.data import load_dataset
from ray_mtt.core.experts import epoch_batches
from ray_mtt.core.models import model_for
from ray_mtt.core.seeds import derive_seed
from ray_mtt.core.train import resolve_device, train_epoch

VARIANTS = {"tensor": ("tensor", "raw"), "ffcv_raw": ("ffcv", "raw"), "ffcv_jpg": ("ffcv", "jpg")}


def config(args, run_dir: str, variant: str, train_per_class: int) -> Config:
    cfg = Config(run_dir=run_dir, device=args.device)
    d = cfg.data
    d.dataset, d.data_dir, d.train_per_class, d.zca = args.dataset, args.data_dir, train_per_class, False
    d.loader, d.beton_format = VARIANTS[variant]
    cfg.model.width, cfg.experts.batch_size = args.width, args.batch_size
    return cfg.validate()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_epoch(batches, preprocess, device) -> int:
    count = 0
    for images, labels in batches:
        preprocess(images)
        count += len(labels)
    sync(device)
    return count


def summary(seconds: list[float], images: int) -> dict:
    rates = sorted(images / s for s in seconds)
    return {"images_per_s": round(statistics.median(rates)), "half_range": round((rates[-1] - rates[0]) / 2),
            "epoch_s": round(statistics.median(seconds), 3), "images": images}


def bench(args, tmp: str, mode: str) -> dict:
    """mode 'load' (the whole training split, loader only) or 'train' (expert epochs on a subset)."""
    device = resolve_device(args.device)
    per_class = 0 if mode == "load" else args.train_per_class
    runs = {}
    for variant in args.variants:
        cfg = config(args, tmp, variant, per_class)
        data = load_dataset(cfg.data, device, keep_train=cfg.data.loader == "tensor")
        if cfg.data.loader == "ffcv" and not beton_file(cfg).is_file():
            start = time.perf_counter()
            path = write_beton(cfg)
            print(f"{variant}: wrote {path.name} ({path.stat().st_size / 2**20:.1f} MiB) in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        batches = epoch_batches(cfg, data)
        torch.manual_seed(0)
        model = model_for(cfg, data.spec).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        augment = DSA(cfg.augment.strategy)

        def epoch(e, batches=batches, data=data, model=model, optimizer=optimizer, augment=augment):
            order = derive_seed(0, "expert_order", 0, e)  # expert 0's epoch e, as expert training draws it
            if mode == "load":
                return load_epoch(batches(order), data.preprocess, device)
            train_epoch(model, optimizer, batches(order), data.preprocess, augment)
            sync(device)
            return len(data.y_train)
        runs[variant] = epoch
        runs[variant](args.repeats)  # warmup, on an epoch order the timed repeats do not reuse
    seconds = {v: [] for v in runs}
    images = {}
    for r in range(args.repeats):
        for variant, epoch in runs.items():
            start = time.perf_counter()
            images[variant] = epoch(r)
            seconds[variant].append(time.perf_counter() - start)
    rows = {v: summary(seconds[v], images[v]) for v in runs}
    base = rows[args.variants[0]]["images_per_s"]
    for v, row in rows.items():
        row["ratio"] = round(row["images_per_s"] / base, 2)
        print(f"{mode:5s} {v:9s} {row['images_per_s']:>9,} +- {row['half_range']:,} images/s "
              f"({row['epoch_s']} s/epoch of {row['images']} images, {row['ratio']}x {args.variants[0]})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--variants", default="tensor,ffcv_raw,ffcv_jpg",
                        help=f"comma-separated, the first is the baseline; of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=32, help="ConvNet width in the train measurement")
    parser.add_argument("--train-per-class", type=int, default=500, help="images per class in the train measurement")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        result = {"load": bench(args, tmp, "load"), "train": bench(args, tmp, "train")}
    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    if args.out:
        Path(args.out).write_text(json.dumps({"device": where, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                                              "torch": torch.__version__, "args": vars(args), **result}, indent=1))


if __name__ == "__main__":
    main()
