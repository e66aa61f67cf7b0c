"""Expert epoch time with SGD against GSAM (FTD's flat experts), and PAD's EL2N scoring pass.

Both optimizers train the same ConvNet from the same initialisation on the same batches, through
core.train.train_epoch as experts do (DSA on), interleaved after a warmup epoch so drift hits both.
The EL2N pass (core.difficulty.el2n) is timed over the same images. From the medians:
GPU-hours of 100 experts x 100 epochs on the full CIFAR-10 training split = epoch seconds x
(50,000 / images timed) x 10,000 / 3600, for each optimizer.

    python benchmarks/bench_gsam.py --data-dir ../shared/data --json benchmarks/results/gsam_epoch_cpu.json
    python benchmarks/bench_gsam.py --device cuda --train-per-class 5000   # on a GPU: the whole split
Without --data-dir the images are random (timing does not depend on content).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ray_mtt.core.augment import DSA  # noqa: E402
from ray_mtt.core.config import Config  # noqa: E402
from ray_mtt.core.data import load_dataset  # noqa: E402
from ray_mtt.core.difficulty import el2n  # noqa: E402
from ray_mtt.core.experts import epoch_batches, expert_optimizer  # noqa: E402
from ray_mtt.core.models import model_for  # noqa: E402
from ray_mtt.core.train import resolve_device, train_epoch  # noqa: E402

FULL_SPLIT, EXPERT_EPOCHS = 50_000, 100 * 100  # CIFAR-10's training images; 100 experts x 100 epochs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--train-per-class", type=int, default=200, help="images per class timed (5000: all)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cfg = Config(device=str(device))
    cfg.data.dataset, cfg.data.data_dir, cfg.data.train_per_class = "cifar10", args.data_dir, args.train_per_class
    cfg.model.width = args.width
    data = load_dataset(cfg.data, device) if args.data_dir else random_cifar(cfg, device)
    batches = epoch_batches(cfg, data)
    models = {}
    for name in ("sgd", "gsam"):
        torch.manual_seed(0)
        model = model_for(cfg, data.spec).to(device)
        cfg.experts.optimizer = name
        models[name] = (model, expert_optimizer(model, cfg.experts))
    augment = DSA(cfg.augment.strategy)
    times = {"sgd": [], "gsam": [], "el2n": []}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, (model, optimizer) in models.items():
            seconds = timed(lambda: train_epoch(model, optimizer, batches(repeat), data.preprocess, augment), device)
            if repeat:
                times[name].append(seconds)
        seconds = timed(lambda: el2n(models["sgd"][0], data), device)
        if repeat:
            times["el2n"].append(seconds)
    images = len(data.y_train)
    medians = {k: statistics.median(v) for k, v in times.items()}
    hours = {k: medians[k] * FULL_SPLIT / images * EXPERT_EPOCHS / 3600 for k in ("sgd", "gsam")}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"{device_name}: ConvNet width {args.width}, {images} CIFAR-10 images per epoch, "
          f"{args.repeats} repeats after a warmup, medians")
    print("| | s/epoch | images/s | GSAM / SGD | hours for 100 x 100 epochs of 50,000 images |\n|---|---|---|---|---|")
    for k in ("sgd", "gsam"):
        print(f"| {k} | {medians[k]:.2f} | {images / medians[k]:.0f} | {medians[k] / medians['sgd']:.2f}x | "
              f"{hours[k]:.1f} |")
    print(f"| EL2N scoring pass | {medians['el2n']:.2f} | {images / medians['el2n']:.0f} | | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "args": vars(args), "images": images,
                                               "times": times, "medians": medians, "hours_100x100": hours}, indent=1))


def random_cifar(cfg: Config, device):
    """CIFAR-10's shapes with random uint8 content (the loader, model and DSA cost the same)."""
    from ray_mtt.core.data import Dataset, Preprocess
    from ray_mtt.core.datasets import get_spec
    spec = get_spec("cifar10")
    n = 10 * cfg.data.train_per_class
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    y = torch.arange(10).repeat_interleave(cfg.data.train_per_class).to(device)
    return Dataset(spec, [str(i) for i in range(10)], x, y, x[:0], y[:0], x[:0], y[:0],
                   Preprocess(spec.mean, spec.std).to(device))


if __name__ == "__main__":
    main()
