"""Phase 1: train expert networks on the real data and save their parameters after every epoch.

`python -m ray_mtt.experts --dataset cifar10 --num-experts 100 --epochs 50 [--storage PATH_OR_URI]`
runs on Ray Train (scale/experts_job.py): on the cluster this machine belongs to, or on a local
one. `--engine local` trains in this process with torch alone. Rerunning the same command skips
finished experts and resumes partial ones.
"""
from __future__ import annotations

import argparse
import time

from .common import add_job_args, make_experts, parse_command


def add_short_forms(parser: argparse.ArgumentParser) -> None:
    short = parser.add_argument_group("short forms")
    short.add_argument("--num-experts", dest="experts.num_experts", default=argparse.SUPPRESS,
                       help="short for --experts.num_experts")
    short.add_argument("--epochs", dest="experts.epochs", default=argparse.SUPPRESS, help="short for --experts.epochs")
    short.add_argument("--storage", dest="experts.dir", default=argparse.SUPPRESS,
                       help="trajectory store: a path (shared on a cluster) or a URI such as s3://bucket/experts "
                       "(default: under $RAY_MTT_STORAGE when set)")


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_command("python -m ray_mtt.experts", __doc__, argv, add_short_forms, add_job_args)
    start = time.perf_counter()
    store = make_experts(cfg, args)
    accs = [store.open(k).info["epochs"][-1]["test_acc"] for k in store.completed()]
    print(f"{len(accs)} experts in {store.root} ({time.perf_counter() - start:.0f} s); "
          f"final test accuracy {sum(accs) / len(accs):.3f} mean over experts")
