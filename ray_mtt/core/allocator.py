"""Keep freed CPU memory in the process for reuse (glibc malloc), instead of returning it.

Training loops allocate and free activation-sized tensors at every step (an unrolled distillation
iteration: hundreds of 52 MB tensors for CIFAR-10 IPC 10; an expert step on 256 CIFAR images:
134 MB ones). glibc serves blocks over its mmap threshold (at most 32 MB) with fresh mmap calls
and unmaps them on free, so each such tensor is page-faulted in and zeroed by the kernel again:
on the project's CPU box, 15 s of system CPU time in each 30 s CIFAR-10 IPC 10 iteration
(N=30; benchmarks/RESULTS.md).
Raising the mmap and trim thresholds keeps those blocks in the heap, as PyTorch's caching
allocator does on a GPU. The cost is fragmentation: a higher peak RSS (measured there too).
RAY_MTT_MALLOC=default leaves glibc as it is.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
THRESHOLD = 1 << 30  # blocks up to 1 GiB come from (and go back to) the heap

_retained = False


def retain_freed_memory() -> bool:
    """Set once per process; True when glibc took the setting (False elsewhere or when opted out)."""
    global _retained
    if _retained or os.environ.get("RAY_MTT_MALLOC", "retain") == "default":
        return _retained
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        _retained = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        _retained = False
    return _retained


def retain_freed_memory_on(device) -> None:
    """What the training loops call: the setting matters only where tensors live in CPU memory."""
    if device.type == "cpu":
        retain_freed_memory()
