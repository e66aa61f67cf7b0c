"""Phase 3: the paper's evaluation protocol.

Train fresh networks on a (distilled or real) set: SGD momentum 0.9, weight decay 5e-4, the given
lr decayed x0.1 at half the epochs, batch 256, DSA on every batch, as the authors' evaluate_synset
does it (epochs + 1 passes, a fresh optimizer at the decay); report accuracy on held-out
data as mean +- std over several networks, for any registered architecture. Every network draws
its initial weights, batch order and augmentations from its own random stream (seeds.py), never
from one an expert used.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .allocator import retain_freed_memory_on
from .augment import DSA
from .config import Config
from .data import Dataset
from .errors import UserError
from .models import model_for
from .seeds import generator, seed_everything
from .train import ShuffledBatches, accuracy, train_epoch


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
                    data: Dataset, x_eval: torch.Tensor, y_eval: torch.Tensor, stream: tuple,
                    epochs: int | None = None) -> float:
    """Train one fresh network on float (preprocessed) images; accuracy on uint8 x_eval.
    `stream` = (purpose, index...) names this network's own random stream."""
    retain_freed_memory_on(images.device)
    seed_everything(cfg.seed, *stream, 0)  # the network's init and its DSA draws
    ev = cfg.eval
    epochs = epochs or ev.epochs
    model = model_for(cfg, data.spec, model_name).to(images.device)
    augment = DSA(cfg.augment.strategy, cfg.augment.siamese)
    order = generator(cfg.seed, *stream, 1)  # its minibatch order
    images, labels = images.detach(), labels.detach()
    # The authors' evaluate_synset: epochs + 1 passes; after pass epochs // 2 + 1 the lr drops x0.1 in a
    # new optimizer, so the momentum restarts too.
    for epoch in range(epochs + 1):
        if epoch in (0, epochs // 2 + 2):
            optimizer = torch.optim.SGD(model.parameters(), lr=lr if epoch == 0 else 0.1 * lr, momentum=ev.momentum,
                                        weight_decay=ev.weight_decay)
        train_epoch(model, optimizer, ShuffledBatches(images, labels, ev.batch_size, order), lambda x: x, augment)
    return accuracy(model, x_eval, y_eval, data.preprocess)


def evaluation_stream(split: str, iteration: int, run: int) -> tuple:
    """The random stream of one evaluation network: (purpose, distillation iteration, run)."""
    return ("validation" if split == "val" else "evaluation", iteration, run)


def score(images: torch.Tensor, labels: torch.Tensor, lr: float, cfg: Config, data: Dataset,
          models: list[str] | None = None, num_runs: int | None = None, split: str = "test",
          epochs: int | None = None, iteration: int = 0, progress: bool = False) -> dict[str, Score]:
    """Accuracy of networks trained on (images, labels), per architecture, on the val or test split.
    `iteration` tells repeated scorings apart: the distillation iteration a validation belongs to (0 otherwise)."""
    x_eval, y_eval = (data.x_val, data.y_val) if split == "val" else (data.x_test, data.y_test)
    if len(x_eval) == 0:
        raise UserError(f"the {split} split is empty; raise data.val_per_class to hold out validation images")
    models = models or cfg.eval.models
    num_runs = num_runs or cfg.eval.num_runs
    results = {}
    jobs = tqdm([(m, r) for m in models for r in range(num_runs)], desc=f"evaluate ({split})",
                disable=not progress, leave=False)
    for name, run in jobs:
        acc = train_and_score(name, images, labels, lr, cfg, data, x_eval, y_eval,
                              evaluation_stream(split, iteration, run), epochs=epochs)
        results.setdefault(name, Score(name, [])).accs.append(acc)
    return results


def random_real_set(cfg: Config, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: ipc random training images per class, drawn from their own stream."""
    x, y = data.random_real(cfg.distill.ipc, generator(cfg.seed, "random_real"))
    return data.preprocess(x), y


def training_labels(synthetic: dict) -> torch.Tensor:
    """What networks train on: softmax of the learned logits (soft cross-entropy), else the classes."""
    logits = synthetic.get("label_logits")
    return synthetic["labels"] if logits is None else logits.detach().float().softmax(1)


def hard_labels_row(name: str = "distilled") -> str:
    return f"{name}, hard labels"


HARD_LABELS = hard_labels_row()


def report_sets(synthetic: dict, cfg: Config, data: Dataset | None, baseline: bool = True,
                name: str = "distilled") -> dict[str, tuple]:
    """The rows of a report, name -> (images, labels, lr): the distilled set as made; with learned labels
    also the same images with their classes (what the labels add, the DD-Ranking critique); and a
    random-real set of the same IPC (it has no learned lr: eval.lr_real)."""
    lr = float(synthetic["lr"])
    rows = {name: (synthetic["images"], training_labels(synthetic), lr)}
    if synthetic.get("label_logits") is not None:
        rows[hard_labels_row(name)] = (synthetic["images"], synthetic["labels"], lr)
    if baseline:
        rows["random real"] = (*random_real_set(cfg, data), cfg.eval.lr_real)
    return rows


def score_with_baseline(synthetic: dict, cfg: Config, data: Dataset, models: list[str] | None = None,
                        progress: bool = False, baseline: bool = True,
                        name: str = "distilled") -> dict[str, dict[str, Score]]:
    """Test accuracy of each report_sets row, per architecture: the table every report prints."""
    return {row: score(images, labels, lr, cfg, data, models=models, progress=progress)
            for row, (images, labels, lr) in report_sets(synthetic, cfg, data, baseline, name).items()}


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
