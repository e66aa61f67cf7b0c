"""Where one distillation iteration's time goes (`python -m ray_mtt.bench --profile`).

One iteration as the distiller runs it (`core.distill.run_iteration`, its phases timed inside the
algorithm), on a bench Problem (the config's shapes, random content): the two expert rows read
from the problem's trajectory store, the minibatch and DSA draws, the matching gradient and the
two optimizer steps. A second, identical iteration runs under torch.profiler for the top
operators by self time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from ..core.timing import PhaseTimer
from .problem import Problem, variant_iteration

PHASE_ORDER = ("expert rows read", "DSA parameter sampling", "DSA application", "student forward",
               "inner gradients", "outer backward", "outer backward (recomputes each step)", "optimizer steps")


@dataclass
class Profile:
    phases: dict[str, float]  # seconds of one iteration per phase
    system: dict[str, float]  # of which the process spent in the kernel (all threads' CPU time)
    total: float  # seconds of the whole iteration, timed around it
    total_system: float
    operators: list[dict]  # top operators: name, calls, self seconds, share of self time


def profile_iteration(problem: Problem, mode: str = "unrolled", top: int = 12) -> Profile:
    device = problem.device
    variant_iteration(problem, mode)  # warmup: allocator, oneDNN/cuDNN plans
    timer, whole = PhaseTimer(device), PhaseTimer(device)
    with whole("iteration"):
        variant_iteration(problem, mode, timer)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        variant_iteration(problem, mode)
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
