"""Keep freed CPU memory in the process for reuse (glibc malloc), instead of returning it.

An unrolled distillation iteration allocates and frees hundreds of activation-sized tensors
(52 MB each for CIFAR-10 IPC 10). glibc serves blocks over its mmap threshold (at most 32 MB)
with fresh mmap calls and unmaps them on free, so every such tensor is page-faulted in and zeroed
by the kernel again: on the project's CPU box that was 40 % of the iteration (system time),
see benchmarks/RESULTS.md. Raising the mmap and trim thresholds keeps those blocks in the heap,
as PyTorch's caching allocator does on a GPU. RAY_MTT_MALLOC=default leaves glibc as it is.
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
