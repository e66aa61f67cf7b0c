"""Hyperparameter sweeps of distillation on Ray Tune, tracked in MLflow.

    python -m ray_mtt.tune --dataset tiny_imagenet --data-dir DATA --num-samples 16

The search space covers N (syn_steps), M (expert_epochs), T+ (max_start_epoch), lr_img, lr_lr and
the initial alpha (lr_teacher) around the values of the shipped <dataset>_ipc<k>.yaml; change any
dimension with --space (e.g. --space distill.lr_img=loguniform:100:10000 --space
distill.syn_steps=choice:10,20,40). ASHA stops weak trials early on the periodic validation
accuracy; --search optuna uses Optuna's TPE instead of random sampling. A killed or interrupted
sweep continues with --resume. MLflow gets one parent run per sweep, one child run per trial, and
for the best trial a test-accuracy table over architectures.

The experts' own lr is not swept: each value needs its own expert trajectories (train them with
`python -m ray_mtt.experts --experts.lr X --experts.dir D`, then sweep with --experts D).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import UserError
from ..core.evaluate import format_table
from ..scale.tracking import default_tracking_uri
from ..scale.tune import CROSS_ARCH, SWEPT, SweepOptions, SweepOutcome, parse_space, run_sweep
from .common import parse_command


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--num-samples", type=int, default=8, help="trials to sample (default 8)")
    sweep.add_argument("--experts", help="trajectory store (path or URI); default <run_dir>/<dataset>/experts_<model>[_zca]")
    sweep.add_argument("--make-experts", action="store_true", help="train the experts first when they are missing")
    sweep.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                       help="override one search dimension: loguniform:A:B, uniform:A:B, choice:X,Y or a fixed value")
    sweep.add_argument("--search", choices=("random", "optuna"), default="random")
    sweep.add_argument("--no-asha", action="store_true", help="run every trial to the end (no early stopping)")
    sweep.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: as resources allow)")
    sweep.add_argument("--cpus-per-trial", type=float, default=1)
    sweep.add_argument("--gpus-per-trial", type=float, default=-1, help="default: 1 when the cluster has GPUs, else 0")
    sweep.add_argument("--name", help="sweep name (default <dataset>_ipc<k>); its folder is <run_dir>/tune/<name>")
    sweep.add_argument("--resume", action="store_true", help="continue the sweep of the same name")
    sweep.add_argument("--tracking-uri", help="MLflow store (default sqlite:///<run_dir>/mlflow.db; http://... for a server)")
    sweep.add_argument("--eval-models", default=",".join(CROSS_ARCH), help="architectures scored for the best trial")
    sweep.add_argument("--address", help="Ray cluster address (default: connect to a running one, else start locally)")
    sweep.add_argument("--storage", default="", help="Tune's state and trial checkpoints; on a cluster a URI every node "
                       "can write (s3://BUCKET/sweeps); default <run_dir>/tune/ray")
    sweep.add_argument("--max-trial-failures", type=int, default=2,
                       help="restarts of a trial (e.g. its node was lost) from its last checkpoint")


def print_outcome(outcome: SweepOutcome, num_runs: int, tracking_uri: str) -> None:
    ranked = outcome.ranked
    print("\ntrials (best validation accuracy over the run):")
    print("| trial | " + " | ".join(k.split(".")[1] for k in SWEPT) + " | iterations | best val acc |")
    print("|---|" + "---|" * (len(SWEPT) + 2))
    for r in ranked:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (r.config.get(k) for k in SWEPT)]
        print(f"| {Path(r.path).name[:24]} | " + " | ".join(cells) + f" | {r.metrics['iteration']} | "
              f"{100 * r.metrics['best_val_acc']:.1f} % |")
    best = ranked[0]
    print(f"\nbest trial {best.metrics['trial_id']}: val acc {100 * best.metrics['best_val_acc']:.1f} %, "
          f"worst {100 * ranked[-1].metrics['best_val_acc']:.1f} %; test accuracy over {num_runs} networks:")
    print(format_table(outcome.scores))
    print(f"MLflow: {tracking_uri} (parent run {outcome.parent_run_id})\n{outcome.ui_hint}")


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_command("python -m ray_mtt.tune", __doc__, argv, add_sweep_args)
    if args.experts:
        cfg.experts.dir = args.experts
    cfg = cfg.absolute_paths()
    if args.num_samples < 1:
        raise UserError("--num-samples must be >= 1")
    opts = SweepOptions(
        name=args.name or f"{cfg.data.dataset}_ipc{cfg.distill.ipc}", num_samples=args.num_samples,
        user_space=parse_space(args.space, cfg),  # bad input fails here, before data, experts and Ray
        search=args.search, asha=not args.no_asha, max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, resume=args.resume,
        tracking_uri=args.tracking_uri or default_tracking_uri(cfg.run_dir),
        eval_models=[m for m in args.eval_models.split(",") if m], address=args.address,
        make_experts=args.make_experts, storage=args.storage, max_trial_failures=args.max_trial_failures)
    print_outcome(run_sweep(cfg, opts), cfg.eval.num_runs, opts.tracking_uri)
