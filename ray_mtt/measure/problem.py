"""Distillation time per iteration and peak memory, for the paper's configs.

Timing does not depend on image content, so no dataset is needed: the synthetic set and a one-expert
trajectory store (written to a temporary folder, read row by row as the distiller reads it) hold
random tensors of the right shapes (dataset resolution, IPC x classes, ConvNet of the config's depth).
Each timed iteration is the distiller's own, `core.distill.run_iteration`. Every variant runs in the
same process, interleaved, after a warmup, and is reported as a ratio against the plain unrolled path:

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

Peak memory is measured in memory.py.
"""
from __future__ import annotations

import contextlib
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch

from ..core.augment import DSA
from ..core.config import METHODS, Config, apply_overrides, default_config_path, load_yaml
from ..core.datasets import get_spec
from ..core.distill import run_iteration, synthetic_optimizers
from ..core.matching import MATCHING_GRAD, SyntheticSet, sample_plan
from ..core.errors import UserError
from ..core.models import FlatModel, model_for
from ..core.timing import NO_TIMER, NoTimer, PhaseTimer
from ..core.trajectories import Trajectory, TrajectoryStore

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
    trajectory: Trajectory  # one expert whose rows 0 and M are the iteration's start and target
    dsa: DSA
    size: int
    optimizers: list = field(default_factory=list)
    folder: tempfile.TemporaryDirectory | None = None  # holds the trajectory store; removed with the problem
    graph: "GraphedIteration | None" = None

    @property
    def device(self) -> torch.device:
        return self.syn.images.device


def write_trajectory(root: str, start: torch.Tensor, snapshots: int) -> Trajectory:
    """One finished expert with rows of the student's size, in the format experts write."""
    store = TrajectoryStore(root)
    store.init({"bench": True})
    for epoch in range(snapshots):
        store.save_epoch(0, epoch, start + 0.01 * epoch * torch.randn_like(start), {})
    store.finish(0, {})
    return store.open(0)


def make_problem(name: str, device: torch.device, syn_steps: int | None = None, width: int | None = None) -> Problem:
    """`name`: a shipped config, <dataset>_ipc<k> (MTT's) or <method>/<dataset>_ipc<k> (e.g. datm/cifar10_ipc50)."""
    method, _, config = name.rpartition("/")
    dataset, _, ipc = config.rpartition("_ipc")
    if not dataset or not ipc.isdigit() or method not in ("", *METHODS):
        raise UserError(f"config name {name!r} must look like [<method>/]<dataset>_ipc<k> (e.g. cifar10_ipc10, "
                        f"datm/cifar10_ipc50), method one of {', '.join(METHODS)}")
    path = default_config_path(dataset, int(ipc), method or "mtt")
    if not path.is_file():
        raise UserError(f"no shipped config {name!r} ({path} is missing)")
    cfg = apply_overrides(Config(), load_yaml(path), name)
    d = cfg.distill
    d.syn_steps = syn_steps or d.syn_steps
    cfg.model.width = width or cfg.model.width
    # The config's shapes, not its step sizes: random content would drift under lr_img, and an SGD
    # step costs the same whatever its lr.
    d.lr_img = d.lr_lr = 1e-9
    spec = get_spec(cfg.data.dataset)
    torch.manual_seed(0)
    student = FlatModel(model_for(cfg, spec).to(device))
    folder = tempfile.TemporaryDirectory(prefix="ray_mtt_bench_")
    trajectory = write_trajectory(folder.name, student.flatten().cpu(), d.expert_epochs + 1)
    images = torch.randn(d.ipc * spec.num_classes, spec.channels, spec.size, spec.size, device=device)
    labels = torch.arange(spec.num_classes, device=device).repeat_interleave(d.ipc)
    logits = torch.randn(len(labels), spec.num_classes, device=device).requires_grad_(True) if d.soft_labels else None
    syn = SyntheticSet(images.requires_grad_(True), labels, torch.tensor(d.lr_teacher, device=device).requires_grad_(True),
                       logits)
    return Problem(cfg, student, syn, trajectory, DSA(cfg.augment.strategy), spec.size, synthetic_optimizers(syn, d),
                   folder)


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
    autocast = torch.autocast(problem.device.type, torch.bfloat16, enabled=variant == "bf16")
    try:
        with autocast:
            yield
    finally:
        cuda[0].allow_tf32, cuda[1].allow_tf32 = saved


def grad_path(variant: str) -> str:
    """The matching-gradient path a variant runs: every variant but checkpointed runs the unrolled one."""
    return "checkpointed" if variant == "checkpointed" else "unrolled"


class GraphedIteration:
    """The matching gradient of one unrolled iteration captured as a CUDA graph, on its own static
    copies of the inputs (other variants replace the problem's tensors), replayed as a whole. The
    only variant that is not run_iteration: a graph cannot hold the host-side row read and draws."""

    def __init__(self, problem: Problem):
        d, device = problem.cfg.distill, problem.device
        syn, self.student = problem.syn, problem.student
        def leaf(t):
            return None if t is None else t.detach().clone().requires_grad_(True)
        self.syn = SyntheticSet(leaf(syn.images), syn.labels, leaf(syn.lr), leaf(syn.label_logits))
        self.start, self.target = (problem.trajectory.snapshot(e).to(device) for e in (0, d.expert_epochs))
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
        for t in (self.syn.images, self.syn.lr, self.syn.label_logits):  # captured backward writes fresh grads
            if t is not None:
                t.grad = None
        MATCHING_GRAD["unrolled"](self.student, self.syn, self.start, self.target, self.plan)

    def replay(self) -> None:
        self.graph.replay()


def variant_iteration(problem: Problem, variant: str, timer: PhaseTimer | NoTimer = NO_TIMER) -> None:
    """One distillation iteration (the distiller's run_iteration) under a variant's settings."""
    if variant == "cuda_graph":
        if problem.graph is None:
            problem.graph = GraphedIteration.capture(problem)
        return problem.graph.replay()
    with variant_settings(variant, problem):
        run_iteration(problem.student, problem.syn, problem.trajectory, 0, problem.cfg.distill, problem.dsa,
                      problem.size, problem.optimizers, grad_path(variant), timer)


def time_variants(problem: Problem, variants: list[str], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per iteration of each variant, interleaved so drift hits all of them alike."""
    device = problem.device
    times = {v: [] for v in variants}
    for v in variants:
        for _ in range(warmup):
            variant_iteration(problem, v)
    for _ in range(repeats):
        for v in variants:
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                variant_iteration(problem, v)
                end.record()
                torch.cuda.synchronize(device)
                times[v].append(begin.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                variant_iteration(problem, v)
                times[v].append(time.perf_counter() - t0)
    return times


def count_flops(problem: Problem, path: str) -> int:
    """FLOPs of one iteration of a path, counted by torch's flop counter (convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        variant_iteration(problem, path)
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
