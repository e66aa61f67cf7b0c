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

from .config import Config, add_config_args, config_from_args
from .data import Dataset, load_dataset
from .distill import Reporter, distill
from .errors import UserError, run_cli
from .evaluate import format_table, load_synthetic, random_real_set, score
from .experts import add_job_args, make_experts
from .train import resolve_device


def open_tracking(tracking_uri: str | None, cfg: Config, run_name: str):
    """(client, run id) of a new MLflow run, or None when tracking is off or mlflow is absent.

    mlflow is imported only here, so the algorithm keeps running on a box with only torch."""
    if tracking_uri == "none":
        return None
    try:
        from . import tracking
    except ImportError:
        if tracking_uri:
            raise UserError("--tracking-uri needs mlflow (pip install mlflow); or pass --tracking-uri none") from None
        print("mlflow is not installed: not tracking this run")
        return None
    uri = tracking_uri or tracking.default_tracking_uri(cfg.run_dir)
    client, experiment_id = tracking.open_experiment(uri, cfg.run_dir)
    run_id = tracking.start_run(client, experiment_id, run_name, tracking.flat_config(cfg),
                                tags={"ray_mtt.kind": "distill"})
    print(f"MLflow run {run_id} in {uri}")
    return client, run_id


def reporter_for(tracked, data: Dataset, cfg: Config) -> Reporter | None:
    if tracked is None:
        return None
    from .tracking import MlflowReporter
    return MlflowReporter(tracked[0], tracked[1], data.preprocess, cfg.distill.ipc)


def finish_tracking(tracked, scores: dict, summary: dict) -> None:
    if tracked is not None:
        from .tracking import log_result
        log_result(tracked[0], tracked[1], scores, summary)
        tracked[0].set_terminated(tracked[1])


def run_pipeline(cfg: Config, job: argparse.Namespace, progress: bool = True, tracking_uri: str | None = None) -> dict:
    device = resolve_device(cfg.device)
    data = load_dataset(cfg.data, device)
    tracked = open_tracking(tracking_uri, cfg, f"{cfg.data.dataset} ipc{cfg.distill.ipc}")
    times = {}
    t0 = time.perf_counter()
    make_experts(cfg, job, data, progress=progress)
    times["experts_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = distill(cfg, data, reporter=reporter_for(tracked, data, cfg), progress=progress)
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
    finish_tracking(tracked, {"distilled": distilled, "random real": baseline},
                    {"s_per_iter": result["s_per_iter"], "best_val_acc": result["val_acc"], **times})
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
    add_tracking_arg(parser)
    add_job_args(parser)
    add_config_args(parser)
    args = parser.parse_args(argv)
    run_pipeline(config_from_args(args), args, tracking_uri=args.tracking_uri)


def add_tracking_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", help="MLflow store: default sqlite:///<run_dir>/mlflow.db when mlflow is "
                        "installed; http://host:port for a server; 'none' to turn tracking off")


if __name__ == "__main__":
    run_cli(main)
