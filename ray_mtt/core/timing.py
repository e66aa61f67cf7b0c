"""Wall time per named phase, for the profile of one distillation iteration (bench --profile).

The algorithm takes a timer and wraps its phases in it; the default does nothing, so the
distiller pays one no-op context manager per phase.
"""
from __future__ import annotations

import contextlib
import resource
import time
from collections import defaultdict

import torch


class PhaseTimer:
    """Wall seconds per phase, summed over calls, and the process's system (kernel) CPU seconds in
    them: page faults and zeroing of fresh memory show up there. On CUDA it synchronises around
    each phase, so the phases add up to the iteration (which then runs a little slower)."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.system: dict[str, float] = defaultdict(float)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.sync()
        t0, s0 = time.perf_counter(), _system_seconds()
        try:
            yield
        finally:
            self.sync()
            self.seconds[phase] += time.perf_counter() - t0
            self.system[phase] += _system_seconds() - s0


def _system_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


class NoTimer:
    def __call__(self, phase: str):
        return contextlib.nullcontext()


NO_TIMER = NoTimer()
