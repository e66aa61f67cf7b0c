"""Score one distilled-set file with ray_mtt's evaluator and with DD-Ranking's training pieces, side by side.

DD-Ranking (PyPI `ddranking`, 0.2.0) pins numpy<2, so it lives in a venv of its own; this script runs
ray_mtt's evaluator here and DD-Ranking in a child process of that venv's python:

    python3 -m venv /tmp/ddr && /tmp/ddr/bin/pip install ddranking==0.2.0
    python benchmarks/score_with_ddranking.py runs/cifar10/ipc1/best.pt --data-dir ../shared/data \
        --ddranking-python /tmp/ddr/bin/python --runs 5 --json benchmarks/results/ddranking_cifar10_ipc1.json

Both sides train ConvNet-3 (width 128, instance norm, avg-pool) on the set's images and hard labels at the
set's learned lr: SGD momentum 0.9, weight decay 5e-4, batch 256, lr x0.1 at half the epochs, one DSA op per
batch with MTT's parameters. ray_mtt's side is `core.evaluate.score` as shipped (its own seeds). DD-Ranking's
side is its own `build_model`, `DSA`, `get_optimizer`, `get_lr_scheduler` and `train_one_epoch` (what its
`LabelRobustScoreHard` runs for a synthetic set, without the dataset download, the real-data runs and the
bugs STACK.md lists), seeded by run index. It reports the final-epoch accuracy and, as DD-Ranking itself
does, the best of the tests every 10 epochs. Test images: the file's own test split preprocessing (its
mean/std or ZCA), identical on both sides, so only the training protocols differ.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DSA_PARAMS = {"scale": 1.2, "rotate": 15.0, "flip": 0.5, "crop": 0.125, "cutout": 0.5, "brightness": 1.0,
              "saturation": 2.0, "contrast": 0.5}  # MTT's ParamDiffAug, under the keys DD-Ranking's DSA reads


def ddranking_runs(inputs: str, runs: int, epochs: int) -> list[dict]:
    """The child, in DD-Ranking's venv: one fresh ConvNet-3 per run, final and best-every-10 accuracy."""
    import torch
    from ddranking.aug import DSA
    from ddranking.utils import build_model, get_lr_scheduler, get_optimizer, train_one_epoch
    saved = torch.load(inputs, weights_only=True)
    images, labels, lr = saved["images"], saved["labels"], float(saved["lr"])
    x_test, y_test = saved["x_test"], saved["y_test"]
    size = tuple(images.shape[-2:])

    def accuracy(model) -> float:
        model.eval()
        with torch.no_grad():
            return float((model(x_test).argmax(1) == y_test).float().mean())
    results = []
    for run in range(runs):
        torch.manual_seed(run)
        model = build_model("ConvNet-3", num_classes=int(labels.max()) + 1, im_size=size, device="cpu")
        optimizer = get_optimizer("sgd", model, lr, 5e-4, 0.9)
        scheduler = get_lr_scheduler("step", optimizer, epochs, epochs // 2)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=256,
                                             shuffle=True)
        dsa, best = DSA(dict(DSA_PARAMS)), 0.0
        for epoch in range(epochs):
            train_one_epoch(epoch=epoch, stu_model=model, loader=loader, loss_fn=torch.nn.CrossEntropyLoss(),
                            optimizer=optimizer, aug_func=dsa, lr_scheduler=scheduler, log_interval=10**9,
                            device="cpu")
            if (epoch + 1) % 10 == 0:
                best = max(best, accuracy(model))
        results.append({"final": accuracy(model), "best_every_10": best})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def summary(accs: list[float]) -> dict:
    mean = statistics.fmean(accs)
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return {"mean": mean, "std": std, "sem": std / len(accs) ** 0.5, "accs": accs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set_file", nargs="?", help="a distilled set (best.pt)")
    parser.add_argument("--data-dir", default="", help="where the set's dataset is (its test split is scored)")
    parser.add_argument("--ddranking-python", default="", help="the python of a venv with ddranking installed")
    parser.add_argument("--runs", type=int, default=5, help="networks per evaluator")
    parser.add_argument("--epochs", type=int, default=0, help="training epochs (default: the set's eval.epochs)")
    parser.add_argument("--json", default="", help="also write the scores here")
    parser.add_argument("--_child", nargs=3, metavar=("INPUTS", "RUNS", "EPOCHS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(ddranking_runs(args._child[0], int(args._child[1]), int(args._child[2]))))
        return
    if not args.set_file or not args.ddranking_python:
        parser.error("give a set file and --ddranking-python")
    compare(args)


def compare(args) -> None:
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ray_mtt.core.config import config_from_dict
    from ray_mtt.core.data import load_dataset
    from ray_mtt.core.evaluate import load_synthetic, score
    saved = load_synthetic(args.set_file, "cpu")
    cfg = config_from_dict(saved["config"])
    cfg.data.data_dir, cfg.device = args.data_dir or cfg.data.data_dir, "cpu"
    epochs = args.epochs or cfg.eval.epochs
    data = load_dataset(cfg.data, "cpu")
    ours = score(saved["images"], saved["labels"], float(saved["lr"]), cfg, data, models=["convnet"],
                 num_runs=args.runs, epochs=epochs, progress=True)["convnet"].accs
    with tempfile.TemporaryDirectory() as tmp:
        inputs = f"{tmp}/inputs.pt"
        torch.save({"images": saved["images"].detach(), "labels": saved["labels"], "lr": saved["lr"],
                    "x_test": data.preprocess(data.x_test), "y_test": data.y_test}, inputs)
        child = subprocess.run([args.ddranking_python, __file__, "--_child", inputs, str(args.runs), str(epochs)],
                               capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"the DD-Ranking child failed:\n{child.stderr[-3000:]}")
    theirs = json.loads(child.stdout.strip().splitlines()[-1])
    rows = {"ray_mtt (final epoch)": summary(ours),
            "DD-Ranking pieces (final epoch)": summary([r["final"] for r in theirs]),
            "DD-Ranking pieces (best of tests every 10 epochs)": summary([r["best_every_10"] for r in theirs])}
    print(f"\n{args.set_file}: ConvNet-3, {epochs} epochs, lr {float(saved['lr']):.4g}, {args.runs} networks each, "
          f"{len(data.y_test)} test images")
    print("| evaluator | mean +- std | standard error | runs |\n|---|---|---|---|")
    for name, row in rows.items():
        runs = ", ".join(f"{100 * a:.1f}" for a in row["accs"])
        print(f"| {name} | {100 * row['mean']:.1f} +- {100 * row['std']:.1f} % | {100 * row['sem']:.1f} | {runs} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"set_file": str(args.set_file), "epochs": epochs, **rows}, indent=1))


if __name__ == "__main__":
    main()
