"""The main job: experts -> distill -> evaluate, then distilled vs random-real accuracy.

`python -m ray_mtt` with no flags runs it on scikit-learn's bundled 8x8 digits (real data, no
download). Every stage resumes: rerunning the command skips finished experts and continues
distillation from its checkpoint.
"""
from __future__ import annotations

import argparse
import json
import time

from .config import Config, add_config_args, config_from_args
from .data import load_dataset
from .distill import distill
from .errors import run_cli
from .evaluate import format_table, load_synthetic, random_real_set, score
from .experts import train_experts
from .train import resolve_device


def run_pipeline(cfg: Config, progress: bool = True) -> dict:
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data, device)
    times = {}
    t0 = time.perf_counter()
    train_experts(cfg, data, progress=progress)
    times["experts_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = distill(cfg, data, progress=progress)
    times["distill_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    best = load_synthetic(result["best"], device)
    lr = float(best["lr"])
    distilled = score(best["images"], best["labels"], lr, cfg, data, progress=progress)
    x, y = random_real_set(cfg, data, seed=cfg.seed)
    baseline = score(x, y, cfg.eval.lr_real, cfg, data, progress=progress)
    times["evaluate_s"] = time.perf_counter() - t0
    summary = {
        "dataset": cfg.data.dataset, "ipc": cfg.distill.ipc, "best_iteration": result["best_iteration"],
        "val_acc": result["val_acc"], "s_per_iter": result["s_per_iter"], "learned_lr": lr,
        "test": {m: {"mean": s.mean, "std": s.std, "accs": s.accs} for m, s in distilled.items()},
        "random_real_test": {m: {"mean": s.mean, "std": s.std, "accs": s.accs} for m, s in baseline.items()},
        **times,
    }
    (cfg.distill_dir / "results.json").write_text(json.dumps({"config": cfg.to_dict(), **summary}, indent=1))
    print(f"\n{cfg.data.dataset} IPC={cfg.distill.ipc}: test accuracy over {cfg.eval.num_runs} networks "
          f"(synthetic set picked at iteration {result['best_iteration']} on the validation split)")
    print(format_table({f"distilled (lr {lr:.4g})": distilled, "random real": baseline}))
    print(f"times: experts {times['experts_s']:.0f} s, distill {times['distill_s']:.0f} s "
          f"({result['s_per_iter']:.3f} s/iter), evaluate {times['evaluate_s']:.0f} s; "
          f"results in {cfg.distill_dir / 'results.json'}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_mtt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    run_pipeline(config_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
