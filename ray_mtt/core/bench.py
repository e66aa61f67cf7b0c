"""Distillation time per iteration and peak memory, for the paper's configs.

Timing does not depend on image content, so no dataset is needed: the synthetic set, the expert
start and target are random tensors of the right shapes (dataset resolution, IPC x classes,
ConvNet of the config's depth). Every variant runs in the same process, interleaved, after a
warmup, and is reported as a ratio against the plain unrolled path:

  unrolled       the reference: the whole N-step graph kept, fp32, NCHW
  checkpointed   exact same gradient, one step's graph alive at a time (memory flat in N)
  channels_last  unrolled with NHWC tensors
  tf32           unrolled with TF32 matmuls/convolutions (CUDA only)
  bf16           unrolled under bf16 autocast, pixels kept fp32 (changes the numbers: measured only)
  cuda_graph     unrolled, captured once as a CUDA graph and replayed (CUDA only): one fixed minibatch
                 and DSA plan, since the ops a plan draws decide the kernels (launch overhead removed)

FLOPs are counted (torch.utils.flop_counter over one iteration: convolutions and matmuls, forward,
backward and double backward), and set against the device's fp32 peak measured here with a large
matmul (TF32 off).

Peak memory: on CUDA the allocator's peak over the first two iterations of a fresh problem (one-time
buffers such as a CUDA graph's pool included); on CPU the peak resident-set growth of one iteration,
measured in a fresh child process per point (CPU allocators expose no peak).
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

VARIANTS = ("unrolled", "checkpointed", "channels_last", "tf32", "bf16", "cuda_graph")
CUDA_ONLY = ("tf32", "cuda_graph")
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
    graph: "GraphedIteration | None" = None


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


def grad_path(variant: str) -> str:
    """The matching-gradient path a variant runs: every variant but checkpointed runs the unrolled one."""
    return "checkpointed" if variant == "checkpointed" else "unrolled"


class GraphedIteration:
    """One unrolled iteration captured as a CUDA graph, on its own static copies of the inputs (other
    variants replace the problem's tensors), replayed as a whole."""

    def __init__(self, problem: Problem):
        d, device = problem.cfg.distill, problem.start.device
        syn, self.student = problem.syn, problem.student
        self.syn = SyntheticSet(syn.images.detach().clone().requires_grad_(True), syn.labels,
                                syn.lr.detach().clone().requires_grad_(True))
        self.start, self.target = problem.start.clone(), problem.target.clone()
        self.plan = sample_plan(len(syn.images), d.syn_steps, d.batch_syn, problem.dsa, problem.size, device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up on a side stream, as capture requires
            for _ in range(2):
                self.run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.run()

    @classmethod
    def capture(cls, problem: Problem) -> "GraphedIteration":
        """Captured under the reference settings (strict fp32: cuDNN would otherwise allow TF32)."""
        with variant_settings("cuda_graph", problem):
            return cls(problem)

    def run(self) -> None:
        self.syn.images.grad = self.syn.lr.grad = None  # captured backward writes fresh grads, never accumulates
        MATCHING_GRAD["unrolled"](self.student, self.syn, self.start, self.target, self.plan)

    def replay(self) -> None:
        self.graph.replay()


def one_iteration(problem: Problem, variant: str) -> None:
    d = problem.cfg.distill
    if variant == "cuda_graph":
        if problem.graph is None:
            problem.graph = GraphedIteration.capture(problem)
        return problem.graph.replay()
    with variant_settings(variant, problem):
        plan = sample_plan(len(problem.syn.images), d.syn_steps, d.batch_syn, problem.dsa, problem.size,
                           problem.start.device)
        MATCHING_GRAD[grad_path(variant)](problem.student, problem.syn, problem.start, problem.target, plan)
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
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(2):  # the first also pays one-time buffers (cuDNN workspaces, a CUDA graph's pool)
            one_iteration(problem, variant)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    # CPU: a fresh process per point, since a process's peak RSS can only grow.
    args = [sys.executable, "-m", "ray_mtt.bench", "--_memory-child", name, variant, str(syn_steps or 0), str(width or 0)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_child(name: str, variant: str, syn_steps: int, width: int) -> None:
    problem = make_problem(name, torch.device("cpu"), syn_steps or None, width or None)
    # No warmup here: glibc keeps freed memory resident, so after one iteration the RSS would
    # already sit at the peak and the growth of a second would read as ~0.
    before = _rss_mb()
    one_iteration(problem, variant)
    print(max(0.0, peak_rss_mb() - before))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across fork and exec, so a
    child started by a large parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def count_flops(problem: Problem, path: str) -> int:
    """FLOPs of one iteration of a path, counted by torch's flop counter (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        one_iteration(problem, path)
    return counter.get_total_flops()


def fp32_peak_tflops(device: torch.device) -> float:
    """Achieved fp32 matmul throughput of this device (TF32 off): the roof the table is set against."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a @ b  # warm up
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        sync()
        return 5 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def summarize(times: list[float]) -> tuple[float, float]:
    """Median and half the spread between the fastest and slowest repeat."""
    return statistics.median(times), (max(times) - min(times)) / 2


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
