"""Phase 3: the paper's evaluation protocol.

Train fresh networks on a (distilled or real) set: SGD momentum 0.9, weight decay 5e-4, the given
lr decayed x0.1 at half the epochs, batch 256, DSA on every batch; report accuracy on held-out
data as mean +- std over several networks, for any registered architecture. Run on a saved
distilled set with `python -m ray_mtt.evaluate --synthetic runs/<dataset>/ipc<k>/best.pt`.
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .augment import DSA
from .config import Config, add_config_args, config_from_args
from .data import Dataset, load_dataset
from .errors import UserError, run_cli
from .models import build_model
from .train import ShuffledBatches, accuracy, resolve_device, train_epoch


@dataclass
class Score:
    model: str
    accs: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.accs) if len(self.accs) > 1 else 0.0

    def __str__(self) -> str:
        return f"{100 * self.mean:.1f} +- {100 * self.std:.1f} %"


def train_and_score(model_name: str, images: torch.Tensor, labels: torch.Tensor, lr: float, cfg: Config,
                    data: Dataset, x_eval: torch.Tensor, y_eval: torch.Tensor, seed: int,
                    epochs: int | None = None) -> float:
    """Train one fresh network on float (preprocessed) images; accuracy on uint8 x_eval."""
    torch.manual_seed(seed)
    spec, ev = data.spec, cfg.eval
    epochs = epochs or ev.epochs
    model = build_model(model_name, spec.channels, spec.num_classes, spec.size, cfg.model.width,
                        cfg.model.depth).to(images.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=ev.momentum, weight_decay=ev.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [epochs // 2], gamma=0.1)
    augment = DSA(cfg.augment.strategy, cfg.augment.siamese)
    gen = torch.Generator().manual_seed(seed)
    images, labels = images.detach(), labels.detach()
    for _ in range(epochs):
        train_epoch(model, optimizer, ShuffledBatches(images, labels, ev.batch_size, gen), lambda x: x, augment)
        schedule.step()
    return accuracy(model, x_eval, y_eval, data.preprocess)


def score(images: torch.Tensor, labels: torch.Tensor, lr: float, cfg: Config, data: Dataset,
          models: list[str] | None = None, num_runs: int | None = None, split: str = "test",
          epochs: int | None = None, seed: int = 0, progress: bool = False) -> dict[str, Score]:
    """Accuracy of networks trained on (images, labels), per architecture, on the val or test split."""
    x_eval, y_eval = (data.x_val, data.y_val) if split == "val" else (data.x_test, data.y_test)
    if len(x_eval) == 0:
        raise UserError(f"the {split} split is empty; raise data.val_per_class to hold out validation images")
    models = models or cfg.eval.models
    num_runs = num_runs or cfg.eval.num_runs
    results = {}
    jobs = tqdm([(m, r) for m in models for r in range(num_runs)], desc=f"evaluate ({split})",
                disable=not progress, leave=False)
    for name, run in jobs:
        acc = train_and_score(name, images, labels, lr, cfg, data, x_eval, y_eval, seed=seed * 1000 + run,
                              epochs=epochs)
        results.setdefault(name, Score(name, [])).accs.append(acc)
    return results


def random_real_set(cfg: Config, data: Dataset, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.random_real(cfg.distill.ipc, torch.Generator().manual_seed(seed))
    return data.preprocess(x), y


def load_synthetic(path: str | Path, device) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"distilled set {path} not found; run `python -m ray_mtt.distill` first or fix --synthetic")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read distilled set {path} ({e}); it is damaged, rerun distillation") from None
    if not {"images", "labels", "lr"} <= set(saved):
        raise UserError(f"{path} is not a distilled set (needs images, labels, lr)")
    return saved


def format_table(rows: dict[str, dict[str, Score]]) -> str:
    """rows: set name -> {model: Score}; one column per model."""
    models = sorted({m for scores in rows.values() for m in scores})
    width = max(len(r) for r in rows) + 2
    lines = [" " * width + "".join(f"{m:>20}" for m in models)]
    for name, scores in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{str(scores[m]) if m in scores else '-':>20}" for m in models))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ray_mtt.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", help="distilled set (.pt from distill); default <distill dir>/best.pt")
    parser.add_argument("--baseline", action="store_true", help="also score a random real subset of the same IPC")
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    device = resolve_device(cfg.device)
    saved = load_synthetic(args.synthetic or cfg.distill_dir / "best.pt", device)
    data = load_dataset(cfg.data, device)
    if tuple(saved["images"].shape[1:]) != (data.spec.channels, data.spec.size, data.spec.size):
        raise UserError(f"distilled images have shape {tuple(saved['images'].shape[1:])}, but {data.spec.name} "
                        f"images are {data.spec.channels}x{data.spec.size}x{data.spec.size}; pick the matching --dataset")
    lr = float(saved["lr"])
    rows = {f"distilled (lr {lr:.4g})": score(saved["images"], saved["labels"], lr, cfg, data, progress=True)}
    if args.baseline:
        x, y = random_real_set(cfg, data)
        rows["random real"] = score(x, y, cfg.eval.lr_real, cfg, data, progress=True)
    print(format_table(rows))


if __name__ == "__main__":
    run_cli(main)
