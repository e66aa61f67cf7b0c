"""The main job: experts -> distill -> evaluate, then distilled vs random-real accuracy.

`python -m ray_mtt` with no flags runs it on scikit-learn's bundled 8x8 digits (real data, no
download), with the experts trained on a local Ray cluster and the run recorded in a local
MLflow store. Every stage resumes: rerunning the command skips finished experts and continues
distillation from its checkpoint.
"""
from __future__ import annotations

import argparse
import json
import time

from ..core.config import Config
from ..core.distill import distill
from ..core.evaluate import (HARD_LABELS, Score, format_table, hard_labels_row, load_synthetic,
                             score_with_baseline)
from ..core.errors import UserError
from .common import (add_job_args, add_tracking_arg, finish_tracking, load_data, make_experts, parse_command,
                     reporter_for, tracked_run)


def run_pipeline(cfg: Config, job: argparse.Namespace, progress: bool = True, tracking_uri: str | None = None) -> dict:
    needed = cfg.distill.max_start_epoch - 1 + cfg.distill.expert_epochs
    if needed > cfg.experts.epochs:  # say so now, not after the experts have trained
        raise UserError(f"distillation needs max_start_epoch - 1 + expert_epochs = {needed} expert epochs but "
                        f"experts.epochs is {cfg.experts.epochs}; raise --experts.epochs or lower "
                        f"--distill.max_start_epoch")
    data = load_data(cfg)
    with tracked_run(tracking_uri, cfg, f"{cfg.data.dataset} ipc{cfg.distill.ipc}") as tracked:
        times, t0 = {}, time.perf_counter()
        make_experts(cfg, job, data, progress=progress)
        times["experts_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        result = distill(cfg, data, reporter=reporter_for(tracked, data, cfg), progress=progress)
        times["distill_s"], t0 = time.perf_counter() - t0, time.perf_counter()
        best = load_synthetic(result["best"], data.x_test.device)
        rows = score_with_baseline(best, cfg, data, progress=progress)
        if "best_ema" in result:  # FTD: the EMA set's own best, on fresh networks of the same streams
            rows.update(score_with_baseline(load_synthetic(result["best_ema"], data.x_test.device), cfg, data,
                                            progress=progress, baseline=False, name=EMA_ROW))
        times["evaluate_s"] = time.perf_counter() - t0
        distilled, baseline = rows["distilled"], rows["random real"]
        finish_tracking(tracked, rows,
                        {"s_per_iter": result["s_per_iter"], "best_val_acc": result["val_acc"], **times})
    summary = {
        "dataset": cfg.data.dataset, "ipc": cfg.distill.ipc, "best_iteration": result["best_iteration"],
        "val_acc": result["val_acc"], "s_per_iter": result["s_per_iter"], "learned_lr": float(best["lr"]),
        "test": scores_json(distilled), "random_real_test": scores_json(baseline), **times,
    }
    extra = {"hard_label_test": HARD_LABELS, "ema_test": EMA_ROW, "ema_hard_label_test": hard_labels_row(EMA_ROW)}
    summary.update({key: scores_json(rows[row]) for key, row in extra.items() if row in rows})
    (cfg.distill_dir / "results.json").write_text(json.dumps({"config": cfg.to_dict(), **summary}, indent=1))
    print(f"\n{cfg.data.dataset} IPC={cfg.distill.ipc}: test accuracy over {cfg.eval.num_runs} networks "
          f"(synthetic set picked at iteration {result['best_iteration']} on the validation split, "
          f"learned lr {float(best['lr']):.4g})")
    print(format_table(rows))
    print(f"times: experts {times['experts_s']:.0f} s, distill {times['distill_s']:.0f} s "
          f"({result['s_per_iter']:.3f} s/iter), evaluate {times['evaluate_s']:.0f} s; "
          f"results in {cfg.distill_dir / 'results.json'}")
    return summary


EMA_ROW = "distilled, EMA"


def scores_json(scores: dict[str, Score]) -> dict:
    return {m: {"mean": s.mean, "std": s.std, "accs": s.accs} for m, s in scores.items()}


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_command("python -m ray_mtt", __doc__, argv, add_tracking_arg, add_job_args)
    run_pipeline(cfg, args, tracking_uri=args.tracking_uri)
