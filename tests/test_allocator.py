"""Freed CPU memory is kept for reuse, so large tensors stop being page-faulted in again."""
import os
import subprocess
import sys

import pytest

# Allocates and frees a 64 MiB tensor 10 times (over glibc's largest mmap threshold, 32 MiB),
# counting the minor page faults of those allocations.
PROBE = """
import resource, torch
from ray_mtt.core.allocator import retain_freed_memory
took = retain_freed_memory()
for _ in range(15):  # glibc grows its heap over the first few (measured: up to 7)
    torch.ones(16 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 * 2**20)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(malloc: str) -> tuple[str, int]:
    env = {**os.environ, "RAY_MTT_MALLOC": malloc}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    took, faults = out.stdout.split()
    return took, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_is_reused_without_page_faults():
    took, retained = page_faults("retain")
    default_took, default = page_faults("default")
    assert (took, default_took) == ("True", "False")
    # glibc as it is maps and faults in every 64 MiB block again: 16384 pages (4 KiB) each time.
    assert default > 10 * 16384 * 0.9
    assert retained < default / 10  # 0 measured here
