"""PAD's EL2N difficulty of every training image, for an expert store with a data schedule.

`python -m ray_mtt.difficulty --dataset cifar10 --data-dir DATA --experts.dir STORE` trains
experts.difficulty_networks networks for experts.difficulty_epochs epochs each (Ray tasks, or
`--engine local`), and writes their mean EL2N into STORE/difficulty/el2n.npy. The experts command
runs it first by itself when `--experts.data_schedule pad` and the scores are missing; a rerun
skips finished networks.
"""
from __future__ import annotations

import time

from ..core.difficulty import SCORES
from .common import add_job_args, parse_command, score_difficulty


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_command("python -m ray_mtt.difficulty", __doc__, argv, add_job_args)
    start = time.perf_counter()
    score_difficulty(cfg, args)
    print(f"EL2N scores of {cfg.experts.difficulty_networks} networks x {cfg.experts.difficulty_epochs} epochs in "
          f"{cfg.expert_dir}/{SCORES} ({time.perf_counter() - start:.0f} s)")
