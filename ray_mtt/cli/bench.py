"""Distillation time per iteration and peak memory, for the paper's configs (ray_mtt/measure/ measures).

Every variant runs in the same process, interleaved, after a warmup, and is reported as a ratio
against the first (the plain unrolled path). Needs only torch: it runs on a bare GPU box.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from ..core.allocator import retain_freed_memory
from ..core.errors import UserError
from ..measure.memory import peak_memory_mb
from ..measure.problem import (CUDA_ONLY, PAPER_3090_S_PER_ITER, VARIANTS, count_flops, device_name, fp32_peak_tflops,
                               grad_path, make_problem, summarize, time_variants)
from ..measure.profile import profile_iteration
from ..core.train import resolve_device
from .common import new_parser

PAPER_CONFIGS = ("cifar10_ipc1,cifar10_ipc10,cifar10_ipc50,cifar100_ipc1,cifar100_ipc10,cifar100_ipc50,"
                 "tiny_imagenet_ipc1,tiny_imagenet_ipc10,tiny_imagenet_ipc50")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = new_parser("python -m ray_mtt.bench", __doc__)
    parser.add_argument("--configs", default=PAPER_CONFIGS,
                        help="comma-separated [<method>/]<dataset>_ipc<k> names of shipped configs, e.g. "
                             "datm/cifar10_ipc50 (default: the MTT paper's table)")
    parser.add_argument("--variants", default="unrolled,checkpointed,channels_last,tf32",
                        help=f"comma-separated, from {', '.join(VARIANTS)}; the first is the baseline of the ratios")
    parser.add_argument("--syn-steps", type=int, default=0, help="override N of every config (0 = the config's)")
    parser.add_argument("--width", type=int, default=0, help="override the ConvNet width (0 = the config's, 128)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing variants: one iteration's seconds per phase and its top operators")
    parser.add_argument("--grad-mode", default="unrolled", choices=("unrolled", "checkpointed"),
                        help="the matching-gradient path --profile breaks down")
    parser.add_argument("--flops", action="store_true",
                        help="count each iteration's FLOPs and report TFLOP/s against the measured fp32 peak")
    parser.add_argument("--peak-memory", action="store_true", help="add each variant's peak memory of one iteration")
    parser.add_argument("--memory-steps", default="", help="comma-separated N values: peak memory vs N per variant")
    parser.add_argument("--memory-only", action="store_true",
                        help="with --memory-steps: skip the timing table (an unrolled iteration at the config's N "
                             "may not fit where the memory points are measured)")
    parser.add_argument("--malloc", default="retain", choices=("retain", "default"),
                        help="CPU: keep freed memory for reuse (what the distiller does) or leave glibc as it is")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the raw measurements to this file")
    parser.add_argument("--tracking-uri", help="also log the results as an MLflow run (sqlite:///..., http://...); "
                        "needs mlflow")
    parser.add_argument("--run_dir", default="runs", help="where a local MLflow store keeps its artifacts")
    return parser.parse_args(argv)


def config_names(args) -> list[str]:
    return [c for c in args.configs.split(",") if c]


def timing_table(args, device, variants: list[str], raw: dict) -> None:
    """One row per config x variant: s/iter, speed-up against the first variant and, when asked,
    the peak memory of an iteration and the achieved TFLOP/s against the measured fp32 peak."""
    peak = fp32_peak_tflops(device) if args.flops else 0.0
    if args.flops:
        raw["fp32_peak_tflops"] = peak
        print(f"measured fp32 peak (matmul, TF32 off): {peak:.2f} TFLOP/s")
    extra = (["peak MiB"] if args.peak_memory else []) + (["GFLOP/iter", "TFLOP/s", "% of fp32 peak"] if args.flops else [])
    columns = ["config", "N", "variant", "s/iter", "speed-up", *extra, "paper 3090 s/iter"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for name in config_names(args):
        problem = make_problem(name, device, args.syn_steps or None, args.width or None)
        times = time_variants(problem, variants, args.warmup, args.repeats)
        raw["timing"][name] = times
        flops = {path: count_flops(problem, path) for path in {grad_path(v) for v in variants}} if args.flops else {}
        baseline = summarize(times[variants[0]])[0]
        paper = PAPER_3090_S_PER_ITER.get((problem.cfg.data.dataset, problem.cfg.distill.ipc), "-")
        for v in variants:
            median, spread = summarize(times[v])
            cells = [name, problem.cfg.distill.syn_steps, v, f"{median:.3f} (+-{spread:.3f})", f"{baseline / median:.2f}x"]
            if args.peak_memory:
                mib = peak_memory_mb(name, v, device, args.syn_steps or None, args.width or None)
                raw["peak_mib"][f"{name}/{v}"] = mib
                cells.append(f"{mib:.0f}")
            if args.flops:
                work = flops[grad_path(v)]
                raw["flops"][f"{name}/{v}"] = work
                cells += [f"{work / 1e9:.1f}", f"{work / median / 1e12:.3f}", f"{100 * work / median / 1e12 / peak:.1f} %"]
            cells.append(paper if v == variants[0] else "")
            print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
        del problem


def memory_table(args, device, variants: list[str], raw: dict) -> None:
    """Peak memory of one iteration against N, for the unrolled and checkpointed paths."""
    steps = [int(s) for s in args.memory_steps.split(",")]
    mem_variants = [v for v in variants if v in ("unrolled", "checkpointed")]
    print(f"\npeak memory of one iteration (MiB) vs N, {'CUDA allocator' if device.type == 'cuda' else 'RSS growth'}")
    print("| config | variant | " + " | ".join(f"N={n}" for n in steps) + " |\n|" + "---|" * (len(steps) + 2))
    for name in config_names(args):
        for v in mem_variants:
            row = [peak_memory_mb(name, v, device, n, args.width or None) for n in steps]
            raw["memory"][f"{name}/{v}"] = dict(zip(steps, row))
            print(f"| {name} | {v} | " + " | ".join(f"{m:.0f}" for m in row) + " |", flush=True)


def profile_tables(args, device, raw: dict) -> None:
    """Per config: one iteration by phase, then the operators with the most self time."""
    for name in config_names(args):
        problem = make_problem(name, device, args.syn_steps or None, args.width or None)
        prof = profile_iteration(problem, args.grad_mode)
        raw["profile"][name] = {"phases": prof.phases, "system": prof.system, "total_s": prof.total,
                                "total_system_s": prof.total_system, "operators": prof.operators}
        print(f"\n{name}, N={problem.cfg.distill.syn_steps}, {args.grad_mode}: {prof.total:.3f} s for one iteration, "
              f"{prof.total_system:.3f} s of system CPU time in it (malloc {args.malloc})")
        print("| phase | seconds | share | system CPU s |\n|---|---|---|---|")
        for phase, seconds in prof.phases.items():
            print(f"| {phase} | {seconds:.3f} | {100 * seconds / prof.total:.1f} % | {prof.system[phase]:.3f} |")
        print(f"| (untimed: Python between phases) | {prof.total - sum(prof.phases.values()):.3f} | | |")
        print("\n| operator | calls | self seconds | share of self time |\n|---|---|---|---|")
        for op in prof.operators:
            print(f"| {op['name']} | {op['calls']} | {op['self_s']:.3f} | {100 * op['share']:.1f} % |", flush=True)
        del problem


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.malloc == "default":
        os.environ["RAY_MTT_MALLOC"] = "default"  # memory children inherit it
    retain_freed_memory()
    device = resolve_device(args.device)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if device.type != "cuda":
        variants = [v for v in variants if v not in CUDA_ONLY]  # TF32 and CUDA graphs exist only there
    timing = "one warm iteration timed by phase, one more under torch.profiler" if args.profile else \
        f"{args.warmup} warmup + {args.repeats} repeats, median (+- half range); ratio = baseline time / variant time"
    print(f"device: {device_name(device)}, torch {torch.__version__}; {timing}; malloc {args.malloc}")
    raw = {"device": device_name(device), "torch": torch.__version__, "timing": {}, "memory": {}, "profile": {}, "flops": {},
           "peak_mib": {}}
    if args.memory_only and not args.memory_steps:
        raise UserError("--memory-only needs --memory-steps N1,N2,...")
    if args.profile:
        profile_tables(args, device, raw)
    elif not args.memory_only:
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
