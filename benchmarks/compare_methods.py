"""Test accuracy of plain MTT against the successors' options, on the same budget, test set and seeds.

Every variant distills with the same iterations, N, M, T+ and learning rates from experts of the
same count and length, then is scored by the same evaluation protocol with the same evaluation
seeds (network i of every row shares its initialisation and batch-order streams). A variant is
the shipped MTT config plus options:

  mtt        the shipped MTT config for the dataset x IPC (with this script's reductions)
  datm       + learned soft labels, init from correctly classified images, the growing start
             window [T-, UB) with UB from T+/2 to T+ over half the iterations, the loss threshold
  datm_hard  datm without the soft labels (what the window, init and threshold do alone)
  mask       + PAD's depth mask, a = 25 %
  att        + ATT's automatic length (N is the longest)
  ema        + FTD's EMA of the images (beta scaled to the budget: see --ema)
  gsam       experts trained with GSAM (FTD: rho 0.01, alpha 0.3): their own store
  gsam_rho0.1  GSAM at 10x FTD's rho (at this scale rho 0.01 moves the experts' final weights by
             under 1 % of their path from SGD's): their own store
  pad        experts on PAD's EL2N schedule (IR 0.75; AEE and removals at 20/40/60 % of the
             epochs, as PAD's 20/40/60 of 100): their own store
  ftd_pad_att  gsam + pad experts (their own store), mask, EMA and ATT together

The variants without their own store share one. A soft-label set is reported twice, with its
learned labels and with hard labels (same images); an EMA run reports its EMA set too. Finished
variants are kept in the --json file and skipped on a rerun; experts and distillation resume.

  python benchmarks/compare_methods.py --data-dir ../shared/data --json benchmarks/results/successors_cifar10_ipc10_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ray_mtt.cli.main import scores_json  # noqa: E402
from ray_mtt.core.config import Config, apply_overrides, default_config_path, load_yaml  # noqa: E402
from ray_mtt.core.data import load_dataset  # noqa: E402
from ray_mtt.core.difficulty import score_locally  # noqa: E402
from ray_mtt.core.distill import distill  # noqa: E402
from ray_mtt.core.evaluate import format_table, load_synthetic, score_with_baseline  # noqa: E402
from ray_mtt.core.experts import epoch_batches, train_experts  # noqa: E402


def variant_options(name: str, args) -> dict:
    datm = {"distill.init": "correct", "distill.min_start_epoch": 0,
            "distill.first_max_start_epoch": max(1, args.max_start_epoch // 2),
            "distill.expansion_iterations": max(1, args.iterations // 2), "distill.loss_threshold": 1.0}
    e = args.expert_epochs
    gsam = {"experts.optimizer": "gsam", "experts.gsam_rho": 0.01, "experts.gsam_alpha": 0.3}
    pad = {"experts.data_schedule": "pad", "experts.schedule_ir": 0.75, "experts.schedule_aee": max(1, round(0.2 * e)),
           "experts.removal_epochs": [round(0.4 * e), round(0.6 * e)], "experts.removal_ratios": [0.1, 0.2],
           "experts.difficulty_networks": 2, "experts.difficulty_epochs": max(1, e // 4)}
    matching = {"distill.mask_ratio": 0.25, "distill.ema": args.ema, "distill.auto_length": True}
    return {"mtt": {}, "datm": {**datm, "distill.soft_labels": True, "distill.lr_y": args.lr_y},
            "datm_hard": datm, "mask": {"distill.mask_ratio": 0.25}, "att": {"distill.auto_length": True},
            "ema": {"distill.ema": args.ema}, "gsam": gsam, "gsam_rho0.1": {**gsam, "experts.gsam_rho": 0.1},
            "pad": pad, "ftd_pad_att": {**gsam, **pad, **matching}}[name]


def store_name(options: dict) -> str:
    """Variants that change how experts train get a store of their own."""
    kinds = [k for k, key in (("gsam", "experts.optimizer"), ("pad", "experts.data_schedule")) if key in options]
    rho = options.get("experts.gsam_rho", 0.01)
    return "experts_" + ("_".join(kinds) or "sgd") + (f"_rho{rho}" if rho != 0.01 else "")


def base_config(args) -> Config:
    cfg = apply_overrides(Config(), load_yaml(default_config_path(args.dataset, args.ipc)), "shipped config")
    return apply_overrides(cfg, {
        "data.data_dir": args.data_dir, "data.train_per_class": args.train_per_class, "model.width": args.width,
        "experts.num_experts": args.experts, "experts.epochs": args.expert_epochs,
        "distill.syn_steps": args.syn_steps, "distill.max_start_epoch": args.max_start_epoch,
        "distill.batch_syn": 0, "distill.iterations": args.iterations, "distill.eval_every": args.iterations // 4,
        "distill.eval_runs": 1, "distill.eval_epochs": min(200, args.eval_epochs), "eval.epochs": args.eval_epochs,
        "eval.num_runs": args.eval_runs, "device": "cpu", "run_dir": args.run_dir}, "compare_methods")


def rows_json(rows: dict) -> dict:
    return {row: scores_json(by_model) for row, by_model in rows.items()}


def paired_table(results: dict) -> str:
    """Every row of every finished variant: mean +- std over the evaluation networks, and the mean +-
    std (population, as in every table here) of its difference from MTT's network of the same index
    (same init, same batch order), which takes the networks' shared luck out of the comparison."""
    lines = ["| variant | row | test accuracy | minus MTT, paired by network |", "|---|---|---|---|"]
    base = results["variants"].get("mtt", {}).get("rows", {}).get("distilled", {}).get("convnet", {}).get("accs")
    for name, variant in results["variants"].items():
        for row, by_model in variant["rows"].items():
            accs = by_model["convnet"]["accs"]
            cell = "-"
            if base and len(base) == len(accs) > 1:
                diffs = [100 * (a - b) for a, b in zip(accs, base)]
                cell = f"{statistics.mean(diffs):+.1f} +- {statistics.pstdev(diffs):.1f}"
            lines.append(f"| {name} | {row} | {100 * by_model['convnet']['mean']:.1f} +- "
                         f"{100 * by_model['convnet']['std']:.1f} % | {cell} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--variants", default="mtt,datm,datm_hard,mask,att,ema,gsam,gsam_rho0.1,pad,ftd_pad_att")
    parser.add_argument("--width", type=int, default=32, help="ConvNet width (the paper's: 128)")
    parser.add_argument("--train-per-class", type=int, default=1000, help="real images per class the experts see")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--expert-epochs", type=int, default=12)
    parser.add_argument("--syn-steps", type=int, default=10)
    parser.add_argument("--max-start-epoch", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--lr-y", type=float, default=2.0, help="DATM's C10 IPC 10 value")
    parser.add_argument("--ema", type=float, default=0.99,
                        help="EMA beta; FTD's 0.9995 over 5000 iterations leaves e^-2.5 of the initial images, "
                             "0.99 over 200 leaves e^-2")
    parser.add_argument("--eval-epochs", type=int, default=300)
    parser.add_argument("--eval-runs", type=int, default=5)
    parser.add_argument("--run-dir", default="runs/compare_methods")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    out = Path(args.json)
    results = json.loads(out.read_text()) if out.is_file() else {"args": vars(args), "variants": {}}
    data = load_dataset(base_config(args).validate().data, "cpu")
    for name in [v for v in args.variants.split(",") if v]:
        if name in results["variants"]:
            print(f"{name}: done earlier, kept")
            continue
        options = variant_options(name, args)
        store = store_name(options)
        vcfg = apply_overrides(base_config(args), {**options, "experts.dir": str(Path(args.run_dir) / store),
                                                   "distill.out_dir": str(Path(args.run_dir) / name)}, name).validate()
        t0 = time.perf_counter()
        if vcfg.experts.data_schedule == "pad":
            score_locally(vcfg, data, epoch_batches(vcfg, data))
        train_experts(vcfg, data)  # kept when the store has them
        results.setdefault("experts_s", {}).setdefault(store, time.perf_counter() - t0)
        t0 = time.perf_counter()
        summary = distill(vcfg, data)
        distill_s = time.perf_counter() - t0
        rows = score_with_baseline(load_synthetic(summary["best"], "cpu"), vcfg, data, progress=True,
                                   baseline=name == "mtt")
        if "best_ema" in summary:
            rows.update(score_with_baseline(load_synthetic(summary["best_ema"], "cpu"), vcfg, data, progress=True,
                                            baseline=False, name="distilled, EMA"))
        print(f"\n{name}: best iteration {summary['best_iteration']}, {summary['s_per_iter']:.2f} s/iter")
        print(format_table(rows))
        results["variants"][name] = {"options": options, "store": store, "rows": rows_json(rows),
                                     "summary": {k: str(v) if isinstance(v, Path) else v for k, v in summary.items()},
                                     "distill_s": distill_s}
        results["torch_threads"] = torch.get_num_threads()
        out.write_text(json.dumps(results, indent=1))
    print(paired_table(results))


if __name__ == "__main__":
    main()
