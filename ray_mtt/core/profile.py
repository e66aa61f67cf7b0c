"""Where one distillation iteration's time goes (`python -m ray_mtt.bench --profile`).

One iteration as the distiller runs it, on a bench Problem (the config's shapes, random content):
the two expert rows are read from a real trajectory store written to a temporary folder, then
the minibatch and DSA draws, the matching gradient (its phases timed inside the algorithm) and
the two optimizer steps. A second, identical iteration runs under torch.profiler for the top
operators by self time.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from .bench import Problem
from .distill import MATCHING_GRAD, sample_plan
from .timing import NO_TIMER, NoTimer, PhaseTimer
from .trajectories import TrajectoryStore

PHASE_ORDER = ("expert rows read", "DSA parameter sampling", "DSA application", "student forward",
               "inner gradients", "outer backward", "outer backward (recomputes each step)", "optimizer steps")


@dataclass
class Profile:
    phases: dict[str, float]  # seconds of one iteration per phase
    system: dict[str, float]  # of which the process spent in the kernel (all threads' CPU time)
    total: float  # seconds of the whole iteration, timed around it
    total_system: float
    operators: list[dict]  # top operators: name, calls, self seconds, share of self time


def write_store(root: str, problem: Problem, snapshots: int) -> TrajectoryStore:
    """One finished expert with rows of the student's size, in the format experts write."""
    store = TrajectoryStore(root)
    store.init({"profile": True})
    for epoch in range(snapshots):
        store.save_epoch(0, epoch, problem.start + 0.001 * epoch, {})
    store.finish(0, {})
    return store


def one_iteration(problem: Problem, store: TrajectoryStore, mode: str, timer: PhaseTimer | NoTimer) -> None:
    d, device = problem.cfg.distill, problem.start.device
    optimizers = [torch.optim.SGD([t], lr=1e-9, momentum=0.5) for t in (problem.syn.images, problem.syn.lr)]
    with timer("expert rows read"):
        trajectory = store.open(0)
        start, target = (trajectory.snapshot(e).to(device) for e in (0, d.expert_epochs))
    with timer("DSA parameter sampling"):
        plan = sample_plan(len(problem.syn.images), d.syn_steps, d.batch_syn, problem.dsa, problem.size, device)
    MATCHING_GRAD[mode](problem.student, problem.syn, start, target, plan, timer)
    with timer("optimizer steps"):
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)


def profile_iteration(problem: Problem, mode: str = "unrolled", top: int = 12) -> Profile:
    device = problem.start.device
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(tmp, problem, problem.cfg.distill.expert_epochs + 1)
        one_iteration(problem, store, mode, NO_TIMER)  # warmup: allocator, oneDNN/cuDNN plans
        timer, whole = PhaseTimer(device), PhaseTimer(device)
        with whole("iteration"):
            one_iteration(problem, store, mode, timer)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            one_iteration(problem, store, mode, NO_TIMER)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    phases = [p for p in PHASE_ORDER if p in timer.seconds]
    return Profile({p: timer.seconds[p] for p in phases}, {p: timer.system[p] for p in phases},
                   whole.seconds["iteration"], whole.system["iteration"], top_operators(prof, device, top))


def top_operators(prof, device: torch.device, top: int) -> list[dict]:
    """Operators by self time on the device that does the work (CUDA kernels' time on a GPU)."""
    cuda = device.type == "cuda"
    events = list(prof.key_averages())
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(self_us(e) for e in events) or 1
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    return [{"name": e.key, "calls": e.count, "self_s": self_us(e) / 1e6, "share": self_us(e) / total}
            for e in ranked]
