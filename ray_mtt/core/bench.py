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
The command line is `python -m ray_mtt.bench` (cli/bench.py); needs only torch (runs on a bare GPU box).
"""
from __future__ import annotations

import contextlib
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
from .datasets import get_spec
from .distill import MATCHING_GRAD, SyntheticSet, sample_plan
from .errors import UserError
from .models import FlatModel, model_for

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
    student = FlatModel(model_for(cfg, spec).to(device))
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


def memory_child(name: str, variant: str, syn_steps: int, width: int) -> None:
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
