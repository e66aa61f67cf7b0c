"""The dataset the stages use: the splits (a fixed, stratified validation hold-out taken from the
training data) as uint8 tensors on the device, and the preprocessing (mean/std normalization or
kornia ZCA whitening) that turns a batch into network input.

Images stay uint8 (N, C, H, W) on the compute device; `Preprocess` turns a batch into the float
input the networks see, so a whole dataset costs one byte per pixel of device memory.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .datasets import DatasetSpec, RawSplits, get_spec, read_npz
from .errors import UserError
from .image_folder import read_image_folder


class Preprocess:
    """uint8 (N, C, H, W) -> float network input, and back for visualisation."""

    def __init__(self, mean, std, zca=None):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.zca = zca  # (mean_vector, transform, inverse) on flattened images, or None

    def to(self, device) -> "Preprocess":
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        if self.zca is not None:
            self.zca = tuple(t.to(device) for t in self.zca)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        if self.zca is None:
            return (x - self.mean) / self.std
        mean, transform, _ = self.zca
        return ((x.flatten(1) - mean) @ transform.T).view_as(x)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Network input -> RGB in [0, 1] (for image grids)."""
        if self.zca is None:
            x = x * self.std + self.mean
        else:
            mean, _, inverse = self.zca
            x = (x.flatten(1) @ inverse.T + mean).view_as(x)
        return x.clamp(0, 1)


def fit_zca(x_uint8: torch.Tensor, eps: float = 0.1):
    """kornia's ZCA whitening (eps 0.1) fitted on the images given: the training split without the
    validation hold-out (the paper fits on the whole training set, which has no hold-out)."""
    from kornia.enhance import ZCAWhitening
    zca = ZCAWhitening(eps=eps, compute_inv=True)
    zca.fit((x_uint8.float() / 255.0).flatten(1))
    return zca.mean_vector.reshape(-1), zca.transform_matrix, zca.transform_inv


@dataclass
class Dataset:
    spec: DatasetSpec
    classes: list[str]
    x_train: torch.Tensor  # uint8 (N, C, H, W) on the device; empty when experts stream it from a .beton
    y_train: torch.Tensor  # (N,) labels, kept even when x_train streams
    x_val: torch.Tensor  # held out from training (experts never see it)
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    preprocess: Preprocess

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def random_real(self, ipc: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """ipc random training images per class (uint8) and their labels."""
        xs, ys = [], []
        for c in range(self.num_classes):
            idx = torch.nonzero(self.y_train == c).flatten()
            if len(idx) < ipc:
                raise UserError(f"class {c} of {self.spec.name} has {len(idx)} training images, fewer than "
                                f"ipc={ipc}; lower --ipc or data.val_per_class")
            pick = idx[torch.randperm(len(idx), generator=generator)[:ipc].to(idx.device)]
            xs.append(self.x_train[pick])
            ys.append(self.y_train[pick])
        return torch.cat(xs), torch.cat(ys)


def _check_raw(raw: RawSplits, spec: DatasetSpec, source: Path) -> None:
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        want = (spec.size, spec.size, spec.channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != want or x.dtype != np.uint8:
            raise UserError(f"{source}: x_{split} is {x.dtype} {tuple(x.shape)}, expected uint8 (N, {want[0]}, "
                            f"{want[1]}, {want[2]}) for {spec.name}; convert the data or pick the matching --dataset")
        if len(x) != len(y):
            raise UserError(f"{source}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
            raise UserError(f"{source}: y_{split} labels must lie in 0..{spec.num_classes - 1}")


def split_validation(y: np.ndarray, per_class: int, num_classes: int,
                     train_per_class: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified hold-out (seed 0), so experts and distillation agree on it; optionally
    only the first `train_per_class` remaining images of each class are kept for training."""
    rng = np.random.default_rng(0)
    train, val = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        held = np.sort(rng.permutation(idx)[:per_class])
        rest = np.setdiff1d(idx, held)
        val.append(held)
        train.append(rest[:train_per_class] if train_per_class else rest)
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def check_data_place(cfg: DataConfig) -> Path:
    """The checks that read no file: a known dataset name and a data dir that exists."""
    data_dir = Path(cfg.data_dir or "data")
    if cfg.dataset != "folder":
        get_spec(cfg.dataset)
    if (cfg.data_dir or cfg.dataset == "folder") and not data_dir.is_dir():
        raise UserError(f"data dir {data_dir} does not exist; pass the folder that holds {cfg.dataset} via --data-dir")
    return data_dir


def read_raw(cfg: DataConfig) -> tuple[RawSplits, DatasetSpec, Path]:
    data_dir = check_data_place(cfg)
    if cfg.dataset == "folder":  # the user's own images: the spec (classes, size) comes from the folder
        raw, spec = read_image_folder(cfg, data_dir)
        _check_raw(raw, spec, data_dir)
        return raw, spec, data_dir
    spec = get_spec(cfg.dataset)
    npz = data_dir / f"{cfg.dataset}.npz"
    raw = read_npz(npz, spec) if npz.is_file() else spec.read(data_dir, cfg.download, spec)
    _check_raw(raw, spec, npz if npz.is_file() else data_dir)
    return raw, spec, data_dir


@dataclass
class Splits:
    """The splits as uint8 (N, H, W, C) numpy arrays and int64 labels, plus the fitted ZCA matrices:
    what crosses a process or node boundary. On a cluster the driver reads the files once and
    workers get this through Ray's object store, so no worker ever reads the driver's disk."""
    spec: DatasetSpec
    classes: list[str]
    x_train: np.ndarray | None  # None when experts stream the training split from a .beton
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    zca: tuple[torch.Tensor, ...] | None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.x_train, self.x_val, self.x_test) if a is not None)


def read_splits(cfg: DataConfig, keep_train: bool = True, zca: tuple[torch.Tensor, ...] | None = None) -> Splits:
    """Read the files, hold out the validation split, fit ZCA on the training split (unless the
    matrices are given). keep_train=False drops the training images once ZCA no longer needs them."""
    raw, spec, _ = read_raw(cfg)
    train_idx, val_idx = split_validation(raw.y_train, cfg.val_per_class, spec.num_classes, cfg.train_per_class)
    x_train = np.asarray(raw.x_train[train_idx]) if keep_train or (cfg.zca and zca is None) else None
    if cfg.zca and zca is None:
        zca = fit_zca(torch.from_numpy(np.ascontiguousarray(x_train.transpose(0, 3, 1, 2))))
    return Splits(
        spec=dataclasses.replace(spec, read=None),  # a reader is no data: keep the object picklable
        classes=raw.classes or [str(i) for i in range(spec.num_classes)],
        x_train=x_train if keep_train else None, y_train=raw.y_train[train_idx],
        x_val=np.asarray(raw.x_train[val_idx]), y_val=raw.y_train[val_idx],
        x_test=np.asarray(raw.x_test[:]), y_test=raw.y_test, zca=zca if cfg.zca else None)


def to_device(splits: Splits, device: torch.device | str) -> Dataset:
    """The splits as uint8 (N, C, H, W) tensors on `device`, with their preprocessing."""
    spec = splits.spec

    def tensor(x):  # (N, H, W, C) uint8 -> (N, C, H, W)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)

    # Without training images (they stream from a .beton) the labels stay: they say how many the stream holds.
    x_train = tensor(splits.x_train) if splits.x_train is not None else \
        torch.zeros(0, spec.channels, spec.size, spec.size, dtype=torch.uint8, device=device)
    return Dataset(
        spec=spec, classes=splits.classes,
        x_train=x_train, y_train=torch.from_numpy(splits.y_train).to(device),
        x_val=tensor(splits.x_val), y_val=torch.from_numpy(splits.y_val).to(device),
        x_test=tensor(splits.x_test), y_test=torch.from_numpy(splits.y_test).to(device),
        preprocess=Preprocess(spec.mean, spec.std, splits.zca).to(device),
    )


def load_dataset(cfg: DataConfig, device: torch.device | str = "cpu", keep_train: bool = True,
                 zca: tuple[torch.Tensor, ...] | None = None) -> Dataset:
    """read_splits then to_device: the dataset from local files. `zca`: matrices fit_zca gave for
    this same config, so a sweep fits them once rather than per trial."""
    return to_device(read_splits(cfg, keep_train, zca), device)
