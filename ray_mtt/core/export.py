"""A distilled set out of this project: plain images a person can look at, and a uint8 .npz in the
project's own data layout (`x_train`, `y_train`, `x_test`, `y_test`, `classes`) that any loader of
it, this project's `--data-dir` included, reads back.

The set is stored in network-input space (normalised or ZCA-whitened); the file also holds the
preprocessing (core/distill.py: synthetic_file), which is inverted here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid

from .data import Preprocess
from .errors import UserError


def preprocess_of(saved: dict) -> Preprocess:
    """The preprocessing a set file records; files from before it was recorded are a one-line error."""
    pre = saved.get("preprocess")
    if pre is None:
        raise UserError("this set file does not record its preprocessing (it predates that); rerun distillation "
                        "or score it with `python -m ray_mtt.evaluate --synthetic FILE --dataset NAME`")
    zca = tuple(pre["zca"][k] for k in ("mean", "transform", "inverse")) if pre.get("zca") else None
    return Preprocess(pre["mean"].tolist(), pre["std"].tolist(), zca)


def to_pixels(saved: dict) -> torch.Tensor:
    """Network-input images -> float RGB (or grey) in [0, 1], (N, C, H, W)."""
    return preprocess_of(saved).inverse(saved["images"].detach().float().cpu())


def image_grid(pixels: torch.Tensor, ipc: int) -> np.ndarray:
    """Pixels in [0, 1] stored class by class -> a uint8 HxWxC grid, one column per class."""
    num_classes = len(pixels) // ipc
    order = torch.arange(len(pixels)).view(num_classes, ipc).T.reshape(-1)
    grid = make_grid(pixels[order], nrow=num_classes, padding=1, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> uint8 (N, H, W, C), the project's data layout."""
    return (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def write_png(saved: dict, out: Path) -> list[Path]:
    """One folder per class (`<index>_<name>/<k>.png`) and grid.png; returns the files written."""
    from PIL import Image
    pixels = to_pixels(saved)
    images, labels = to_uint8(pixels), saved["labels"].cpu().numpy()
    classes = saved.get("classes") or [str(i) for i in range(int(labels.max()) + 1)]
    written, counts = [], {}
    for image, label in zip(images, labels):
        k = counts[label] = counts.get(label, -1) + 1
        path = out / f"{label:03d}_{_safe(classes[label])}" / f"{k:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)
        written.append(path)
    grid = image_grid(pixels, len(images) // len(classes))
    (out / "grid.png").parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(out / "grid.png")
    soft = soft_labels(saved)
    if soft is None:
        return [*written, out / "grid.png"]
    rows = [",".join(["file", *map(_safe, classes)])]  # each image's learned label, one probability per class
    rows += [",".join([str(path.relative_to(out)), *(f"{p:.6g}" for p in probs)]) for path, probs in zip(written, soft)]
    (out / "soft_labels.csv").write_text("\n".join(rows) + "\n")
    return [*written, out / "grid.png", out / "soft_labels.csv"]


def soft_labels(saved: dict) -> np.ndarray | None:
    """softmax of a set's learned label logits (DATM), float32 (N, classes); None for hard labels."""
    logits = saved.get("label_logits")
    return None if logits is None else logits.detach().float().softmax(1).cpu().numpy()


def write_npz(saved: dict, path: Path, test: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """The set as `x_train`/`y_train` (+ `y_train_soft`, the learned labels' probabilities, when it has
    them); `x_test`/`y_test` are the real test split when given, else empty."""
    images = to_uint8(to_pixels(saved))
    labels = saved["labels"].cpu().numpy().astype(np.int64)
    x_test, y_test = test if test is not None else (np.zeros((0, *images.shape[1:]), np.uint8), np.zeros(0, np.int64))
    classes = np.array(saved.get("classes") or [str(i) for i in range(int(labels.max()) + 1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    soft = soft_labels(saved)  # learned labels travel as probabilities beside the classes
    extra = {} if soft is None else {"y_train_soft": soft}
    np.savez_compressed(path, x_train=images, y_train=labels, x_test=x_test, y_test=y_test, classes=classes, **extra)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))[:40]
