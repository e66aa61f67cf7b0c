"""Phase 2: distill the dataset by matching expert training trajectories (MTT, Algorithm 1).

Keeps the synthetic set with the best validation accuracy as <distill dir>/best.pt, checkpoints
progress, and resumes where it stopped. The algorithm is ray_mtt/core/distill.py.
"""
from __future__ import annotations

from ..core.distill import distill, open_experts
from ..core.seeds import generator
from .common import add_tracking_arg, finish_tracking, load_data, parse_command, reporter_for, tracked_run


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_command("python -m ray_mtt.distill", __doc__, argv, add_tracking_arg)
    data = load_data(cfg)
    experts = open_experts(cfg, data)  # bad input fails here, before a tracking run is opened
    data.random_real(cfg.distill.ipc, generator(cfg.seed, "distill_init"))  # ... and so does an IPC too large
    with tracked_run(args.tracking_uri, cfg, f"distill {cfg.data.dataset} ipc{cfg.distill.ipc}") as tracked:
        result = distill(cfg, data, experts, reporter=reporter_for(tracked, data, cfg))
        finish_tracking(tracked, {}, {"s_per_iter": result["s_per_iter"], "best_val_acc": result["val_acc"]})
    print(f"best synthetic set: {result['best']} (iteration {result['best_iteration']}, val acc "
          f"{100 * result['val_acc']:.1f} %, {result['s_per_iter']:.3f} s/iter, learned lr {result['final_lr']:.4g})")
