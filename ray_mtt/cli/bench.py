"""Distillation time per iteration and peak memory, for the paper's configs (core/bench.py measures).

Every variant runs in the same process, interleaved, after a warmup, and is reported as a ratio
against the first (the plain unrolled path). Needs only torch: it runs on a bare GPU box.
"""
from __future__ import annotations

import argparse
import json

import torch

from ..core.bench import (PAPER_3090_S_PER_ITER, VARIANTS, memory_child, device_name, make_problem, peak_memory_mb,
                          summarize, time_variants)
from ..core.errors import UserError
from ..core.train import resolve_device
from .common import new_parser

PAPER_CONFIGS = ("cifar10_ipc1,cifar10_ipc10,cifar10_ipc50,cifar100_ipc1,cifar100_ipc10,cifar100_ipc50,"
                 "tiny_imagenet_ipc1,tiny_imagenet_ipc10,tiny_imagenet_ipc50")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = new_parser("python -m ray_mtt.bench", __doc__)
    parser.add_argument("--configs", default=PAPER_CONFIGS,
                        help="comma-separated <dataset>_ipc<k> names of shipped configs (default: the paper's table)")
    parser.add_argument("--variants", default="unrolled,checkpointed,channels_last,tf32",
                        help=f"comma-separated, from {', '.join(VARIANTS)}; the first is the baseline of the ratios")
    parser.add_argument("--syn-steps", type=int, default=0, help="override N of every config (0 = the config's)")
    parser.add_argument("--width", type=int, default=0, help="override the ConvNet width (0 = the config's, 128)")
    parser.add_argument("--memory-steps", default="", help="comma-separated N values: peak memory vs N per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the raw measurements to this file")
    parser.add_argument("--tracking-uri", help="also log the results as an MLflow run (sqlite:///..., http://...); "
                        "needs mlflow")
    parser.add_argument("--run_dir", default="runs", help="where a local MLflow store keeps its artifacts")
    parser.add_argument("--_memory-child", nargs=4, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def timing_table(args, device, variants: list[str], raw: dict) -> None:
    """One row per config: s/iter per variant and speed-ups against the first."""
    header = "| config | N | " + " | ".join(f"{v} s/iter" for v in variants) + " | " + \
             " | ".join(f"{v} speed-up" for v in variants[1:]) + " | paper 3090 s/iter |"
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    for name in [c for c in args.configs.split(",") if c]:
        problem = make_problem(name, device, args.syn_steps or None, args.width or None)
        times = time_variants(problem, variants, args.warmup, args.repeats)
        raw["timing"][name] = times
        med = {v: summarize(t) for v, t in times.items()}
        key = (problem.cfg.data.dataset, problem.cfg.distill.ipc)
        print(f"| {name} | {problem.cfg.distill.syn_steps} | "
              + " | ".join(f"{m:.3f} (+-{s:.3f})" for m, s in med.values()) + " | "
              + " | ".join(f"{med[variants[0]][0] / med[v][0]:.2f}x" for v in variants[1:])
              + f" | {PAPER_3090_S_PER_ITER.get(key, '-')} |", flush=True)
        del problem


def memory_table(args, device, variants: list[str], raw: dict) -> None:
    """Peak memory of one iteration against N, for the unrolled and checkpointed paths."""
    steps = [int(s) for s in args.memory_steps.split(",")]
    mem_variants = [v for v in variants if v in ("unrolled", "checkpointed")]
    print(f"\npeak memory of one iteration (MiB) vs N, {'CUDA allocator' if device.type == 'cuda' else 'RSS growth'}")
    print("| config | variant | " + " | ".join(f"N={n}" for n in steps) + " |\n|" + "---|" * (len(steps) + 2))
    for name in [c for c in args.configs.split(",") if c]:
        for v in mem_variants:
            row = [peak_memory_mb(name, v, device, n, args.width or None) for n in steps]
            raw["memory"][f"{name}/{v}"] = dict(zip(steps, row))
            print(f"| {name} | {v} | " + " | ".join(f"{m:.0f}" for m in row) + " |", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._memory_child:
        name, variant, steps, width = args._memory_child
        return memory_child(name, variant, int(steps), int(width))
    device = resolve_device(args.device)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if device.type != "cuda" and "tf32" in variants:
        variants.remove("tf32")  # TF32 exists only on CUDA
    print(f"device: {device_name(device)}, torch {torch.__version__}; {args.warmup} warmup + {args.repeats} repeats, median (+- half range); "
          f"ratio = baseline time / variant time")
    raw = {"device": device_name(device), "torch": torch.__version__, "timing": {}, "memory": {}}
    timing_table(args, device, variants, raw)
    if args.memory_steps:
        memory_table(args, device, variants, raw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
    if args.tracking_uri:
        try:
            from ..scale.tracking import log_bench  # mlflow only when asked for: the benchmark runs on a torch-only box
        except ImportError:
            raise UserError("--tracking-uri needs mlflow (pip install mlflow); or drop the flag") from None
        settings = {k: str(getattr(args, k)) for k in ("configs", "variants", "syn_steps", "width", "memory_steps",
                                                        "warmup", "repeats")}
        print(f"MLflow run {log_bench(args.tracking_uri, args.run_dir, raw, settings)} in {args.tracking_uri}")
