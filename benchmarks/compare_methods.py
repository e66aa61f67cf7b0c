"""Test accuracy of plain MTT against DATM's options, on the same experts, budget, test set and seeds.

One expert store is trained (or resumed) once; every variant distills from it with the same
iterations, N, M, T+ and learning rates, then is scored by the same evaluation protocol with the
same evaluation seeds (networks i = 0..k-1 of every row share their initialisation and batch
order streams). A variant is the shipped MTT config plus DATM's options:

  mtt        the shipped MTT config for the dataset x IPC (with this script's reductions)
  datm       + learned soft labels, init from correctly classified images, the growing start
             window [T-, UB) with UB from T+/2 to T+ over half the iterations, the loss threshold
  datm_hard  datm without the soft labels (what the window, init and threshold do alone)

A soft-label set is reported twice: with its learned labels and with hard labels (same images).
Finished variants are kept in the --json file and skipped on a rerun; distillation resumes.

  python benchmarks/compare_methods.py --data-dir ../shared/data --json benchmarks/results/datm_cifar10_ipc10_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ray_mtt.core.config import Config, apply_overrides, default_config_path, load_yaml  # noqa: E402
from ray_mtt.core.data import load_dataset  # noqa: E402
from ray_mtt.core.distill import distill  # noqa: E402
from ray_mtt.core.evaluate import format_table, load_synthetic, score_with_baseline  # noqa: E402
from ray_mtt.core.experts import train_experts  # noqa: E402


def variant_options(name: str, args) -> dict:
    datm = {"distill.init": "correct", "distill.min_start_epoch": 0,
            "distill.first_max_start_epoch": max(1, args.max_start_epoch // 2),
            "distill.expansion_iterations": max(1, args.iterations // 2), "distill.loss_threshold": 1.0}
    return {"mtt": {}, "datm": {**datm, "distill.soft_labels": True, "distill.lr_y": args.lr_y},
            "datm_hard": datm}[name]


def base_config(args) -> Config:
    cfg = apply_overrides(Config(), load_yaml(default_config_path(args.dataset, args.ipc)), "shipped config")
    return apply_overrides(cfg, {
        "data.data_dir": args.data_dir, "data.train_per_class": args.train_per_class, "model.width": args.width,
        "experts.num_experts": args.experts, "experts.epochs": args.expert_epochs,
        "distill.syn_steps": args.syn_steps, "distill.max_start_epoch": args.max_start_epoch,
        "distill.batch_syn": 0, "distill.iterations": args.iterations, "distill.eval_every": args.iterations // 4,
        "distill.eval_runs": 1, "distill.eval_epochs": 200, "eval.epochs": args.eval_epochs,
        "eval.num_runs": args.eval_runs, "device": "cpu", "run_dir": args.run_dir}, "compare_methods")


def scores_json(rows: dict) -> dict:
    return {row: {m: {"mean": s.mean, "std": s.std, "accs": s.accs} for m, s in by_model.items()}
            for row, by_model in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--variants", default="mtt,datm,datm_hard")
    parser.add_argument("--width", type=int, default=32, help="ConvNet width (the paper's: 128)")
    parser.add_argument("--train-per-class", type=int, default=1000, help="real images per class the experts see")
    parser.add_argument("--experts", type=int, default=6)
    parser.add_argument("--expert-epochs", type=int, default=15)
    parser.add_argument("--syn-steps", type=int, default=20)
    parser.add_argument("--max-start-epoch", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--lr-y", type=float, default=2.0, help="DATM's C10 IPC 10 value")
    parser.add_argument("--eval-epochs", type=int, default=1000)
    parser.add_argument("--eval-runs", type=int, default=5)
    parser.add_argument("--run-dir", default="runs/compare_methods")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    out = Path(args.json)
    results = json.loads(out.read_text()) if out.is_file() else {"args": vars(args), "variants": {}}
    cfg = base_config(args).validate()
    data = load_dataset(cfg.data, "cpu")
    t0 = time.perf_counter()
    train_experts(cfg, data)
    results.setdefault("experts_s", time.perf_counter() - t0)
    for name in [v for v in args.variants.split(",") if v]:
        if name in results["variants"]:
            print(f"{name}: done earlier, kept")
            continue
        vcfg = apply_overrides(base_config(args), {**variant_options(name, args),
                                                   "distill.out_dir": str(Path(args.run_dir) / name)}, name).validate()
        t0 = time.perf_counter()
        summary = distill(vcfg, data)
        distill_s = time.perf_counter() - t0
        best = load_synthetic(summary["best"], "cpu")
        rows = score_with_baseline(best, vcfg, data, progress=True, baseline=name == "mtt")
        print(f"\n{name}: best iteration {summary['best_iteration']}, {summary['s_per_iter']:.2f} s/iter")
        print(format_table(rows))
        results["variants"][name] = {"options": variant_options(name, args), "rows": scores_json(rows),
                                     "best_iteration": summary["best_iteration"], "val_acc": summary["val_acc"],
                                     "s_per_iter": summary["s_per_iter"], "distill_s": distill_s,
                                     "learned_lr": float(best["lr"])}
        results["torch_threads"] = torch.get_num_threads()
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
