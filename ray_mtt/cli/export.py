"""Export a distilled set as viewable images or as a uint8 .npz in the project's data layout.

    python -m ray_mtt.export runs/cifar10/ipc1 --format png --out cifar10_ipc1_png
    python -m ray_mtt.export runs/cifar10/ipc1/best.pt --format npz --out sets/cifar10.npz --data-dir DATA

png: one folder per class and grid.png (rows = images of a class index, columns = classes), and
soft_labels.csv (each image's learned label, one probability per class) when the set learned labels.
npz: x_train/y_train = the set in uint8 (the preprocessing undone), classes, y_train_soft (the
learned labels' probabilities) when the set has them; with --data-dir the
real test split of the same dataset is copied in as x_test/y_test, so the file can be fed back as
`--data-dir` (rename it <dataset>.npz).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.config import DataConfig
from ..core.data import read_raw
from ..core.errors import UserError
from ..core.evaluate import load_synthetic
from ..core.export import write_npz, write_png
from .common import new_parser


def set_file(run_or_file: str) -> Path:
    path = Path(run_or_file)
    return path / "best.pt" if path.is_dir() else path


def main(argv: list[str] | None = None) -> None:
    parser = new_parser("python -m ray_mtt.export", __doc__)
    parser.add_argument("set", metavar="RUN_OR_FILE", help="a distilled set (.pt) or a run folder holding best.pt")
    parser.add_argument("--format", choices=("png", "npz"), default="png")
    parser.add_argument("--out", help="output folder (png) or file (npz); default beside the set")
    parser.add_argument("--data-dir", help="npz only: copy this dataset's real test split into the file")
    args = parser.parse_args(argv)
    path = set_file(args.set)
    saved = load_synthetic(path, "cpu")
    if args.format == "png":
        out = Path(args.out or path.with_suffix("")) 
        files = [f for f in write_png(saved, out) if f.parent != out]
        print(f"wrote {len(files)} images and {out / 'grid.png'}"
              + (f" and {out / 'soft_labels.csv'}" if "label_logits" in saved else ""))
        return
    test = None
    if args.data_dir:
        if "dataset" not in saved:
            raise UserError(f"{path} does not record its dataset; export without --data-dir")
        raw, _, _ = read_raw(DataConfig(dataset=saved["dataset"], data_dir=args.data_dir))
        test = (np.asarray(raw.x_test[:]), raw.y_test)
    out = write_npz(saved, Path(args.out or path.with_suffix(".npz")), test)
    print(f"wrote {out} ({len(saved['labels'])} images" + (f", {len(test[1])} test images)" if test else ")"))
