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
Every sweep flag is a field of scale/options.py SweepOptions.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import UserError
from ..core.evaluate import format_table
from ..scale.options import SweepOptions
from ..scale.tune import SweepOutcome, run_sweep
from .common import add_options, options_from_args, parse_command


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SweepOptions, "sweep")
    parser.add_argument("--experts", dest="experts.dir", default=argparse.SUPPRESS,
                        help="short for --experts.dir: the trajectory store (path or URI) the trials distill from")


def print_outcome(outcome: SweepOutcome, num_runs: int) -> None:
    ranked = outcome.ranked
    swept = list(ranked[0].config)  # the search space's dimensions
    print("\ntrials (best validation accuracy over the run):")
    print("| trial | " + " | ".join(k.split(".")[-1] for k in swept) + " | iterations | best val acc |")
    print("|---|" + "---|" * (len(swept) + 2))
    for r in ranked:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (r.config.get(k) for k in swept)]
        print(f"| {Path(r.path).name[:24]} | " + " | ".join(cells) + f" | {r.metrics['iteration']} | "
              f"{100 * r.metrics['best_val_acc']:.1f} % |")
    best = ranked[0]
    print(f"\nbest trial {best.metrics['trial_id']}: val acc {100 * best.metrics['best_val_acc']:.1f} %, "
          f"worst {100 * ranked[-1].metrics['best_val_acc']:.1f} %; test accuracy over {num_runs} networks:")
    print(format_table(outcome.scores))
    print(f"MLflow: {outcome.tracking_uri} (parent run {outcome.parent_run_id})\n{outcome.ui_hint}")


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_command("python -m ray_mtt.tune", __doc__, argv, add_sweep_args)
    opts = options_from_args(SweepOptions, args)
    if opts.num_samples < 1:
        raise UserError("--num-samples must be >= 1")
    print_outcome(run_sweep(cfg.absolute_paths(), opts), cfg.eval.num_runs)
