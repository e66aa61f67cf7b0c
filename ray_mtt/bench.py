"""Distillation time per iteration and peak memory, for the paper's configs.

Timing does not depend on image content, so no dataset is needed: the synthetic set, the expert
start and target are random tensors of the right shapes (dataset resolution, IPC x classes,
ConvNet of the config's depth). Every variant runs in the same process, interleaved, after a
warmup, and is reported as a ratio against the plain unrolled path:

  unrolled       the reference: the whole N-step graph kept, fp32, NCHW
  checkpointed   exact same gradient, one step's graph alive at a time (memory flat in N)
  channels_last  unrolled with NHWC tensors
  tf32           unrolled with TF32 matmuls/convolutions (CUDA only)
  bf16           unrolled under bf16 autocast (changes the numbers: measured, never enabled by default)

Peak memory: on CUDA the allocator's peak for one iteration; on CPU the peak resident-set growth of
one iteration, measured in a fresh child process per point (CPU allocators expose no peak).
`python -m ray_mtt.bench --help`; needs only torch (runs on a bare GPU box).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from .augment import DSA
from .config import Config, apply_overrides, default_config_path, load_yaml
from .data import get_spec
from .distill import MATCHING_GRAD, SyntheticSet, sample_plan
from .errors import UserError, run_cli
from .models import FlatModel, build_model
from .train import resolve_device

VARIANTS = ("unrolled", "checkpointed", "channels_last", "tf32", "bf16")
PAPER_3090_S_PER_ITER = {("cifar10", 1): 0.5, ("cifar10", 10): 0.6, ("cifar10", 50): 0.8,
                         ("cifar100", 1): 0.6, ("cifar100", 10): 0.8, ("cifar100", 50): 1.9,
                         ("tiny_imagenet", 1): 1.1, ("tiny_imagenet", 10): 2.3, ("tiny_imagenet", 50): 2.6}


@dataclass
class Problem:
    """One distillation iteration's inputs for a dataset x IPC config, with random content."""
    cfg: Config
    student: FlatModel
    syn: SyntheticSet
    start: torch.Tensor
    target: torch.Tensor
    dsa: DSA
    size: int


def make_problem(name: str, device: torch.device, syn_steps: int | None = None, width: int | None = None) -> Problem:
    dataset, _, ipc = name.rpartition("_ipc")
    if not dataset or not ipc.isdigit():
        raise UserError(f"config name {name!r} must look like <dataset>_ipc<k> (e.g. cifar10_ipc10)")
    cfg = apply_overrides(Config(), load_yaml(default_config_path(dataset, int(ipc))), name)
    if syn_steps:
        cfg.distill.syn_steps = syn_steps
    if width:
        cfg.model.width = width
    spec = get_spec(cfg.data.dataset)
    torch.manual_seed(0)
    model = build_model(cfg.model.name, spec.channels, spec.num_classes, spec.size, cfg.model.width, cfg.model.depth)
    student = FlatModel(model.to(device))
    start = student.flatten()
    target = start + 0.01 * torch.randn_like(start)
    n = cfg.distill.ipc * spec.num_classes
    images = torch.randn(n, spec.channels, spec.size, spec.size, device=device)
    labels = torch.arange(spec.num_classes, device=device).repeat_interleave(cfg.distill.ipc)
    syn = SyntheticSet(images.requires_grad_(True), labels,
                       torch.tensor(cfg.distill.lr_teacher, device=device).requires_grad_(True))
    return Problem(cfg, student, syn, start, target, DSA(cfg.augment.strategy), spec.size)


@contextlib.contextmanager
def variant_settings(variant: str, problem: Problem):
    """Switch a variant's global settings on for the duration of one iteration."""
    cuda = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = cuda[0].allow_tf32, cuda[1].allow_tf32
    cuda[0].allow_tf32 = cuda[1].allow_tf32 = variant == "tf32"  # the reference is strict fp32
    fmt = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    problem.student.module.to(memory_format=fmt)
    with torch.no_grad():
        problem.syn.images.data = problem.syn.images.data.contiguous(memory_format=fmt)
    autocast = torch.autocast(problem.start.device.type, torch.bfloat16, enabled=variant == "bf16")
    try:
        with autocast:
            yield
    finally:
        cuda[0].allow_tf32, cuda[1].allow_tf32 = saved


def one_iteration(problem: Problem, variant: str) -> None:
    d = problem.cfg.distill
    grad_mode = "checkpointed" if variant == "checkpointed" else "unrolled"
    with variant_settings(variant, problem):
        plan = sample_plan(len(problem.syn.images), d.syn_steps, d.batch_syn, problem.dsa, problem.size,
                           problem.start.device)
        MATCHING_GRAD[grad_mode](problem.student, problem.syn, problem.start, problem.target, plan)
        problem.syn.images.grad = problem.syn.lr.grad = None


def time_variants(problem: Problem, variants: list[str], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per iteration of each variant, interleaved so drift hits all of them alike."""
    device = problem.start.device
    times = {v: [] for v in variants}
    for v in variants:
        for _ in range(warmup):
            one_iteration(problem, v)
    for _ in range(repeats):
        for v in variants:
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                one_iteration(problem, v)
                end.record()
                torch.cuda.synchronize(device)
                times[v].append(begin.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                one_iteration(problem, v)
                times[v].append(time.perf_counter() - t0)
    return times


def peak_memory_mb(name: str, variant: str, device: torch.device, syn_steps: int | None, width: int | None) -> float:
    if device.type == "cuda":
        problem = make_problem(name, device, syn_steps, width)
        one_iteration(problem, variant)  # warm up caches and cuDNN plans first
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        one_iteration(problem, variant)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    # CPU: a fresh process per point, since ru_maxrss can only grow.
    args = [sys.executable, "-m", "ray_mtt.bench", "--_memory-child", name, variant, str(syn_steps or 0), str(width or 0)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _memory_child(name: str, variant: str, syn_steps: int, width: int) -> None:
    problem = make_problem(name, torch.device("cpu"), syn_steps or None, width or None)
    # No warmup here: glibc keeps freed memory resident, so after one iteration the RSS would
    # already sit at the peak and the growth of a second would read as ~0.
    before = _rss_mb()
    one_iteration(problem, variant)
    print(max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def summarize(times: list[float]) -> tuple[float, float]:
    """Median and half the spread between the fastest and slowest repeat."""
    return statistics.median(times), (max(times) - min(times)) / 2


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_mtt.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="cifar10_ipc1,cifar10_ipc10,cifar10_ipc50,cifar100_ipc1,cifar100_ipc10,"
                        "cifar100_ipc50,tiny_imagenet_ipc1,tiny_imagenet_ipc10,tiny_imagenet_ipc50",
                        help="comma-separated <dataset>_ipc<k> names from configs/ (default: the paper's table)")
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
    args = parser.parse_args(argv)
    if args._memory_child:
        name, variant, steps, width = args._memory_child
        return _memory_child(name, variant, int(steps), int(width))
    device = resolve_device(args.device)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if device.type != "cuda" and "tf32" in variants:
        variants.remove("tf32")  # TF32 exists only on CUDA
    print(f"device: {device_name(device)}, torch {torch.__version__}; {args.warmup} warmup + {args.repeats} "
          f"repeats, median (+- half range); ratio = baseline time / variant time")
    raw = {"device": device_name(device), "torch": torch.__version__, "timing": {}, "memory": {}}
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
    if args.memory_steps:
        steps = [int(s) for s in args.memory_steps.split(",")]
        mem_variants = [v for v in variants if v in ("unrolled", "checkpointed")]
        print(f"\npeak memory of one iteration (MiB) vs N, {'CUDA allocator' if device.type == 'cuda' else 'RSS growth'}")
        print("| config | variant | " + " | ".join(f"N={n}" for n in steps) + " |\n|" + "---|" * (len(steps) + 2))
        for name in [c for c in args.configs.split(",") if c]:
            for v in mem_variants:
                row = [peak_memory_mb(name, v, device, n, args.width or None) for n in steps]
                raw["memory"][f"{name}/{v}"] = dict(zip(steps, row))
                print(f"| {name} | {v} | " + " | ".join(f"{m:.0f}" for m in row) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
    if args.tracking_uri:
        try:
            from .tracking import log_bench  # mlflow only when asked for: the benchmark runs on a torch-only box
        except ImportError:
            raise UserError("--tracking-uri needs mlflow (pip install mlflow); or drop the flag") from None
        settings = {k: str(getattr(args, k)) for k in ("configs", "variants", "syn_steps", "width", "memory_steps",
                                                        "warmup", "repeats")}
        print(f"MLflow run {log_bench(args.tracking_uri, args.run_dir, raw, settings)} in {args.tracking_uri}")


if __name__ == "__main__":
    run_cli(main)
