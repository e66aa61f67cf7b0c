"""Datasets by name: a registry of their specs, and readers of their official on-disk formats and of
the plain .npz layout. A reader returns uint8 (N, H, W, C) arrays (folder datasets: lazily decoded
`ImageFiles`) and int64 labels; data.py turns them into the splits the stages use.
"""
from __future__ import annotations

import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import UserError

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# ImageNet-1k class indices of the subsets MTT uses; label = position in the list.
IMAGENET_SUBSETS = {
    "imagenette": [0, 217, 482, 491, 497, 566, 569, 571, 574, 701],
    "imagewoof": [193, 182, 258, 162, 155, 167, 159, 273, 207, 229],
    "imagemeow": [281, 282, 283, 284, 285, 291, 292, 290, 289, 287],
    "imagesquawk": [84, 130, 88, 144, 145, 22, 96, 9, 100, 89],
    "imagefruit": [953, 954, 949, 950, 951, 957, 952, 945, 943, 948],
    "imageyellow": [309, 986, 954, 951, 987, 779, 599, 291, 72, 11],
}


class ImageFiles:
    """Image files that decode when indexed (by an int, a slice or an index array), like a read-only
    uint8 (N, size, size, 3) array.

    Folder datasets (Tiny ImageNet, the ImageNet subsets) stay a list of paths until a split is
    used: the default loader stacks the split it needs, the .beton writer streams them one by one.
    """

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = list(paths), size
        self.dtype, self.ndim = np.dtype(np.uint8), 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return _load_image(self.paths[index], self.size)
        picked = np.arange(len(self.paths))[index]  # a slice or an index array, as numpy reads them
        if not len(picked):
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        return np.stack([_load_image(self.paths[i], self.size) for i in picked])


@dataclass
class RawSplits:
    """uint8 images (N, H, W, C) and int64 labels, as read from disk (images maybe still as files)."""
    x_train: np.ndarray | ImageFiles
    y_train: np.ndarray
    x_test: np.ndarray | ImageFiles
    y_test: np.ndarray
    classes: list[str]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    read: Callable[[Path, bool, "DatasetSpec"], RawSplits]  # (data_dir, download, spec)
    how_to_get: str  # shown when the files are missing


DATASETS: dict[str, DatasetSpec] = {}


def register(name, channels, size, num_classes, mean, std, how_to_get):
    def wrap(read):
        DATASETS[name] = DatasetSpec(name, channels, size, num_classes, tuple(mean), tuple(std), read, how_to_get)
        return read
    return wrap


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}, or folder (your own images)")
    return DATASETS[name]


# ---------------------------------------------------------------- readers of official formats
def _missing(spec: DatasetSpec, data_dir: Path) -> UserError:
    return UserError(f"{spec.name} not found in {data_dir}: {spec.how_to_get}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); the file is damaged, download it again") from None


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: expected b'data' of shape (N, 3072), got {data.shape}; the file is not a CIFAR batch")
    # Rows hold the R plane, then G, then B, each 32x32 row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def read_cifar_batches(folder: Path, train_files: list[str], test_files: list[str], label_key: bytes,
                       meta_file: str, names_key: bytes) -> RawSplits:
    # Not torchvision's CIFAR10/100: it refuses any file whose md5 is not the official one ("corrupted"),
    # so a re-packed or subset folder (the form a DD-Ranking-style evaluator writes) could not be read.
    def load(files):
        xs, ys = [], []
        for name in files:
            path = folder / name
            if not path.is_file():
                raise UserError(f"{path} is missing; the CIFAR folder is incomplete, download it again")
            batch = _unpickle(path)
            xs.append(_cifar_images(batch, path))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = load(train_files)
    x_test, y_test = load(test_files)
    meta = _unpickle(folder / meta_file) if (folder / meta_file).is_file() else {}
    classes = [c.decode() for c in meta.get(names_key, [])] or [str(i) for i in range(int(y_train.max()) + 1)]
    return RawSplits(x_train, y_train, x_test, y_test, classes)


def _torchvision_download(cls, data_dir: Path, **kwargs) -> None:
    try:
        cls(root=str(data_dir), download=True, **kwargs)
    except Exception as e:  # network errors come in many types
        raise UserError(f"download into {data_dir} failed ({e}); fetch the files by hand into --data-dir") from None


def _cifar_reader(folder_name: str, tv_class: str, train_files: list[str], test_files: list[str],
                  label_key: bytes, meta_file: str, names_key: bytes):
    """CIFAR-10 and CIFAR-100: the official python pickles in <data_dir>/<folder_name>/."""
    def read(data_dir: Path, download: bool, spec: DatasetSpec) -> RawSplits:
        folder = data_dir / folder_name
        if not folder.is_dir() and download:
            import torchvision.datasets as tvd
            _torchvision_download(getattr(tvd, tv_class), data_dir)
        if not folder.is_dir():
            raise _missing(spec, data_dir)
        return read_cifar_batches(folder, train_files, test_files, label_key, meta_file, names_key)
    return read


register("cifar10", 3, 32, 10, CIFAR_MEAN, CIFAR_STD,
         "put cifar10.npz or the official cifar-10-batches-py/ folder there, or add --data.download true")(
    _cifar_reader("cifar-10-batches-py", "CIFAR10", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                  b"labels", "batches.meta", b"label_names"))
register("cifar100", 3, 32, 100, CIFAR_MEAN, CIFAR_STD,
         "put cifar100.npz or the official cifar-100-python/ folder there, or add --data.download true")(
    _cifar_reader("cifar-100-python", "CIFAR100", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names"))


def _read_torchvision(cls_name: str, split_kw: Callable[[bool], dict]):
    """MNIST-family and SVHN: torchvision reads their official files (idx, .mat) from data_dir."""
    def read(data_dir: Path, download: bool, spec: DatasetSpec) -> RawSplits:
        import torchvision.datasets as tvd
        cls = getattr(tvd, cls_name)
        try:
            train, test = (cls(root=str(data_dir), download=download, **split_kw(t)) for t in (True, False))
        except RuntimeError:
            raise _missing(spec, data_dir) from None
        except Exception as e:
            raise UserError(f"cannot read {spec.name} from {data_dir} ({e}); download it again") from None

        def arrays(ds):
            x = np.asarray(ds.data)
            x = x[..., None] if x.ndim == 3 else x.transpose(0, 2, 3, 1)  # MNIST (N,H,W); SVHN (N,C,H,W)
            y = np.asarray(getattr(ds, "targets", getattr(ds, "labels", None)), dtype=np.int64)
            return x.astype(np.uint8), y
        (xtr, ytr), (xte, yte) = arrays(train), arrays(test)
        classes = list(getattr(train, "classes", [])) or [str(i) for i in range(spec.num_classes)]
        return RawSplits(xtr, ytr, xte, yte, classes)
    return read


register("mnist", 1, 28, 10, (0.1307,), (0.3081,),
         "put mnist.npz or torchvision's MNIST/raw/ idx files there, or add --data.download true")(
    _read_torchvision("MNIST", lambda t: {"train": t}))
register("fashion_mnist", 1, 28, 10, (0.2860,), (0.3530,),
         "put fashion_mnist.npz or torchvision's FashionMNIST/raw/ idx files there, or add --data.download true")(
    _read_torchvision("FashionMNIST", lambda t: {"train": t}))
register("svhn", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
         "put svhn.npz or the official train_32x32.mat/test_32x32.mat there, or add --data.download true")(
    _read_torchvision("SVHN", lambda t: {"split": "train" if t else "test"}))


@register("digits", 1, 8, 10, (0.3,), (0.37,), "it ships with scikit-learn: pip install scikit-learn")
def _read_digits(data_dir: Path, download: bool, spec: DatasetSpec) -> RawSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images): real data with no download."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))  # fixed split: 1497 train, 300 test
    train, test = order[:-300], order[-300:]
    return RawSplits(x[train], y[train], x[test], y[test], [str(i) for i in range(10)])


def _load_image(path: Path, size: int) -> np.ndarray:
    """Decode to RGB and resize to exactly size x size (the authors squash the aspect ratio:
    `Resize((128, 128))`, after which their center crop does nothing)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot decode image {path} ({e}); remove or replace the file") from None


TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


@register("tiny_imagenet", 3, 64, 200, IMAGENET_MEAN, IMAGENET_STD,
          "put the official tiny-imagenet-200/ folder (or tiny_imagenet.npz) there, or add --data.download true")
def _read_tiny(data_dir: Path, download: bool, spec: DatasetSpec) -> RawSplits:
    root = data_dir / "tiny-imagenet-200"
    if not root.is_dir() and download:
        from torchvision.datasets.utils import download_and_extract_archive
        try:
            download_and_extract_archive(TINY_URL, str(data_dir))
        except Exception as e:
            raise UserError(f"download of Tiny ImageNet failed ({e}); fetch {TINY_URL} by hand") from None
    if not (root / "wnids.txt").is_file():
        raise _missing(spec, data_dir)
    wnids = sorted(w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip())
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for w in wnids:
        files = sorted((root / "train" / w / "images").glob("*.JPEG"))
        train_paths += files
        train_labels += [index[w]] * len(files)
    # val/ is flat; the class of each image is only in val_annotations.txt.
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise UserError(f"{annotations} is missing; without it val labels are unknown, download the dataset again")
    val_paths, val_labels = [], []
    for line in annotations.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise UserError(f"{annotations}: bad line {line!r}; expected 'file<TAB>wnid<TAB>bbox'")
        val_paths.append(root / "val" / "images" / parts[0])
        val_labels.append(index[parts[1]])
    words = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, name = line.partition("\t")
            words[wnid] = name
    return RawSplits(ImageFiles(train_paths, 64), np.array(train_labels, np.int64),
                     ImageFiles(val_paths, 64), np.array(val_labels, np.int64), [words.get(w, w) for w in wnids])


def _imagenet_subset_reader(subset: str):
    def read(data_dir: Path, download: bool, spec: DatasetSpec) -> RawSplits:
        if not (data_dir / "train").is_dir() or not (data_dir / "val").is_dir():
            raise _missing(spec, data_dir)
        wnids = sorted(p.name for p in (data_dir / "train").iterdir() if p.is_dir())
        if len(wnids) != 1000:
            raise UserError(f"{data_dir}/train has {len(wnids)} class folders; the ImageNet subsets index the "
                            f"1000 ImageNet-1k classes in sorted wnid order, so point --data-dir at full ImageNet")
        chosen = [wnids[i] for i in IMAGENET_SUBSETS[subset]]

        def split(name):
            paths, labels = [], []
            for label, w in enumerate(chosen):
                files = sorted(f for f in (data_dir / name / w).glob("*") if f.is_file())
                paths += files
                labels += [label] * len(files)
            return ImageFiles(paths, 128), np.array(labels, np.int64)
        (xtr, ytr), (xte, yte) = split("train"), split("val")
        return RawSplits(xtr, ytr, xte, yte, chosen)
    return read


for _subset in IMAGENET_SUBSETS:
    register(_subset, 3, 128, 10, IMAGENET_MEAN, IMAGENET_STD,
             "point --data-dir at an ImageNet-1k folder with train/<wnid>/ and val/<wnid>/ "
             "(val sorted into class folders)")(_imagenet_subset_reader(_subset))


def read_npz(path: Path, spec: DatasetSpec) -> RawSplits:
    """The plain format: x_train/x_test uint8 (N, H, W, C), y_train/y_test int64, classes."""
    try:
        with np.load(path) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise UserError(f"{path} lacks {sorted(missing)}; an .npz needs x_train, y_train, x_test, y_test")
            raw = RawSplits(z["x_train"], z["y_train"].astype(np.int64), z["x_test"], z["y_test"].astype(np.int64),
                            [str(c) for c in z["classes"]] if "classes" in z.files else [])
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); the file is truncated or damaged, "
                        f"replace it") from None
    return raw
