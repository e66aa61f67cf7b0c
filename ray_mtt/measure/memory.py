"""Peak memory of one distillation iteration.

On CUDA: the allocator's peak over the first two iterations of a fresh problem (one-time buffers such
as a CUDA graph's pool included). On CPU: the peak resident-set growth of one iteration, measured in
a fresh child process per point (`python -m ray_mtt.measure.memory`), since a process's peak RSS
can only grow and CPU allocators expose no peak of their own.
"""
from __future__ import annotations

import resource
import subprocess
import sys

import torch

from .problem import make_problem, variant_iteration


def peak_memory_mb(name: str, variant: str, device: torch.device, syn_steps: int | None, width: int | None) -> float:
    if device.type == "cuda":
        problem = make_problem(name, device, syn_steps, width)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(2):  # the first also pays one-time buffers (cuDNN workspaces, a CUDA graph's pool)
            variant_iteration(problem, variant)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    args = [sys.executable, "-m", __name__, name, variant, str(syn_steps or 0), str(width or 0)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def cpu_iteration_growth_mb(name: str, variant: str, syn_steps: int, width: int) -> float:
    """RSS growth of one CPU iteration in this (fresh) process: peak after it minus resident before it."""
    problem = make_problem(name, torch.device("cpu"), syn_steps or None, width or None)
    # No warmup here: glibc keeps freed memory resident, so after one iteration the RSS would
    # already sit at the peak and the growth of a second would read as ~0.
    before = rss_mb()
    variant_iteration(problem, variant)
    return peak_rss_mb() - before


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across fork and exec, so a
    child started by a large parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


if __name__ == "__main__":  # the child of peak_memory_mb on CPU: NAME VARIANT SYN_STEPS WIDTH
    from ..core.allocator import retain_freed_memory
    retain_freed_memory()  # as the distiller does (RAY_MTT_MALLOC=default, inherited, opts out)
    config_name, variant_name, steps, net_width = sys.argv[1:5]
    print(cpu_iteration_growth_mb(config_name, variant_name, int(steps), int(net_width)))
