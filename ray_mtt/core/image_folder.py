"""A dataset of the user's own: `--dataset folder --data-dir PATH --data.image_size 32`.

PATH holds one subfolder per class, either directly (a fixed, stratified share of each class,
`data.test_fraction`, becomes the test split) or under `train/` and `test/`. Images of any size
and format PIL reads are decoded to RGB and resized to image_size x image_size when a split is
used (they stay a list of paths until then). Class index = sorted folder name. The validation
hold-out is taken from the training images as for every other dataset.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import DataConfig
from .datasets import IMAGENET_MEAN, IMAGENET_STD, DatasetSpec, ImageFiles, RawSplits
from .errors import UserError

HOW_TO_GET = "point --data-dir at a folder with one subfolder of images per class (or train/ and test/ of those)"


def _classes(root: Path) -> list[str]:
    """Class folders, sorted (torchvision's ImageFolder convention)."""
    from torchvision.datasets.folder import find_classes  # here: torchvision takes 1.5 s to import
    try:
        classes = find_classes(str(root))[0]
    except FileNotFoundError:
        classes = []
    if len(classes) < 2:
        raise UserError(f"{root} has {len(classes)} class folder(s); {HOW_TO_GET}")
    return classes


def _labelled(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Every image under each class folder (torchvision's walk, by extension), labelled by class index."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    found = make_dataset(str(root), {name: label for label, name in enumerate(classes)}, extensions=IMG_EXTENSIONS,
                         allow_empty=True)  # an empty class is our one-line error below, not torchvision's
    present = {label for _, label in found}
    for label, name in enumerate(classes):
        if label not in present:
            raise UserError(f"{root / name} holds no images ({', '.join(IMG_EXTENSIONS)}); add some or "
                            f"remove the folder")
    return [Path(path) for path, _ in found], [label for _, label in found]


def _split_test(paths: list[Path], labels: list[int], fraction: float) -> tuple[list[int], list[int]]:
    """Indices of train and test: a fixed share of each class (seed 0), at least one image each."""
    rng, train, test = np.random.default_rng(0), [], []
    labels_arr = np.array(labels)
    for c in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == c))
        n_test = max(1, round(len(idx) * fraction))
        if n_test >= len(idx):
            raise UserError(f"class {c} has {len(idx)} image(s): too few to hold out a test share; add images or "
                            f"give train/ and test/ folders")
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return sorted(train), sorted(test)


def read_image_folder(cfg: DataConfig, data_dir: Path) -> tuple[RawSplits, DatasetSpec]:
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} does not exist; {HOW_TO_GET}")
    has_splits = (data_dir / "train").is_dir() and (data_dir / "test").is_dir()
    root = data_dir / "train" if has_splits else data_dir
    classes = _classes(root)
    paths, labels = _labelled(root, classes)
    if has_splits:
        test_paths, test_labels = _labelled(data_dir / "test", classes)
    else:
        train_idx, test_idx = _split_test(paths, labels, cfg.test_fraction)
        test_paths, test_labels = [paths[i] for i in test_idx], [labels[i] for i in test_idx]
        paths, labels = [paths[i] for i in train_idx], [labels[i] for i in train_idx]
    size = cfg.image_size
    spec = DatasetSpec("folder", 3, size, len(classes), IMAGENET_MEAN, IMAGENET_STD, read=None, how_to_get=HOW_TO_GET)
    raw = RawSplits(ImageFiles(paths, size), np.array(labels, np.int64), ImageFiles(test_paths, size),
                    np.array(test_labels, np.int64), classes)
    return raw, spec
