"""Distillation s/iter and peak memory; the same as `python -m ray_mtt.bench` (see its --help).

Run from the repository root: `python benchmarks/bench_distill.py --configs cifar10_ipc10`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_mtt.cli.bench import main  # noqa: E402
from ray_mtt.cli.common import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
