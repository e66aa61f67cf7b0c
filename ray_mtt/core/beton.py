"""FFCV .beton files: the training split written once, then streamed in expert training.

The default loader keeps the whole training split as uint8 on the device. A dataset too large for
that (the ImageNet subsets, full ImageNet) is written once into a .beton and read back by FFCV's
loader: memory-mapped, decoded by compiled threads, batches moved to the device ahead of use.
Its batches are uint8 (N, C, H, W) like the default loader's, so preprocessing and DSA (on the
device) are unchanged, and the same seed and epoch give the same order, so a resumed expert sees
the data it would have seen.

ffcv is optional and imported only here: `pip install 'ray_mtt[ffcv]'` after Debian's
pkg-config, libturbojpeg0-dev and libopencv-dev. `python -m ray_mtt.beton --dataset imagenette
--data-dir DATA` writes the file ahead of a job; otherwise the first expert that needs it does.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .data import read_raw, split_validation
from .datasets import RawSplits
from .errors import UserError

INSTALL_HINT = ("the ffcv loader needs the ffcv extra: apt-get install -y pkg-config libturbojpeg0-dev "
                "libopencv-dev && pip install 'ray_mtt[ffcv]'; or use --data.loader tensor")


def require_ffcv() -> None:
    threads = torch.get_num_threads()
    try:
        import ffcv  # noqa: F401
    except ImportError as e:  # also what a missing libturbojpeg/libopencv at run time looks like
        raise UserError(f"{INSTALL_HINT} ({e})") from None
    # Importing ffcv sets torch to 1 thread; its loader then sets torch to its worker count.
    torch.set_num_threads(threads)


def beton_file(cfg: Config) -> Path:
    d = cfg.data
    folder = Path(d.beton_dir) if d.beton_dir else Path(cfg.run_dir) / d.dataset
    # The name holds what selects the images, so another split or format never reuses a file.
    return folder / f"{d.dataset}_train_val{d.val_per_class}_first{d.train_per_class}_{d.beton_format}.beton"


def _fields(cfg: Config, channels: int, size: int) -> dict:
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    if cfg.data.beton_format == "jpg":
        if channels != 3:
            raise UserError(f"data.beton_format jpg needs RGB images and {cfg.data.dataset} has {channels} channel(s); "
                            f"use --data.beton_format raw")
        return {"image": RGBImageField(write_mode="jpg", jpeg_quality=90), "label": IntField()}
    return {"image": NDArrayField(np.dtype(np.uint8), (size, size, channels)), "label": IntField()}


class _Samples:
    """What FFCV's writer indexes: ((H, W, C) uint8 image, label). Folder images decode here, one
    at a time, in the writer's processes. A writer process that raises leaves FFCV waiting
    forever, so an unreadable image is noted in `errors` and written as zeros instead."""

    def __init__(self, raw: RawSplits, errors: Path):
        self.raw, self.errors = raw, errors

    def __len__(self) -> int:
        return len(self.raw.y_train)

    def __getitem__(self, i: int):
        try:
            image = self.raw.x_train[i]
        except UserError as e:
            with open(self.errors, "a") as f:
                f.write(f"{e}\n")
            image = np.zeros(self.raw.x_train.shape[1:], np.uint8)
        return np.ascontiguousarray(image), int(self.raw.y_train[i])


def write_beton(cfg: Config) -> Path:
    """Write the training split (the validation hold-out excluded) into beton_file(cfg), atomically:
    concurrent writers each write a temp file, and readers only ever see a complete file."""
    require_ffcv()
    from ffcv.writer import DatasetWriter
    raw, spec, _ = read_raw(cfg.data)
    fields = _fields(cfg, spec.channels, spec.size)
    train_idx, _ = split_validation(raw.y_train, cfg.data.val_per_class, spec.num_classes, cfg.data.train_per_class)
    path = beton_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    errors = tmp.with_suffix(".errors")
    try:
        writer = DatasetWriter(str(tmp), fields, num_workers=cfg.data.beton_workers or torch.get_num_threads())
        writer.from_indexed_dataset(_Samples(raw, errors), indices=train_idx)
        if errors.exists():
            first = errors.read_text().splitlines()[0]
            raise UserError(f"{path.name} not written: {first}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        errors.unlink(missing_ok=True)
    return path


def ensure_beton(cfg: Config) -> Path:
    """beton_file(cfg), written first if it does not exist yet."""
    path = beton_file(cfg)
    return path if path.is_file() else write_beton(cfg)


class BetonBatches:
    """FFCV's loader over one .beton: `epoch(seed)` is one epoch of (uint8 images, labels)
    minibatches on `device`, in the order numpy's generator seeded with `seed` draws."""

    def __init__(self, path: Path, batch_size: int, device: torch.device, num_samples: int,
                 image_shape: tuple[int, int, int], workers: int = 0):
        require_ffcv()
        from ffcv.fields import NDArrayField
        from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.reader import Reader
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage
        try:
            reader = Reader(str(path))
            image = reader.handlers["image"]
            found = int(reader.num_samples), tuple(map(int, getattr(image, "shape", image_shape)))  # jpg: no shape
        except Exception as e:  # FFCV raises assorted errors on a damaged header
            raise UserError(f"{path} is not a readable .beton ({type(e).__name__}: {e}); delete it and rerun "
                            f"to write it again") from None
        if found != (num_samples, tuple(image_shape)):
            raise UserError(f"{path} holds {found[0]} images of {found[1]}, expected {num_samples} of "
                            f"{tuple(image_shape)} (written for other data); delete it and rerun to write it again")
        decoder = NDArrayDecoder() if isinstance(image, NDArrayField) else SimpleRGBImageDecoder()
        non_blocking = device.type == "cuda"
        self.loader = Loader(str(path), batch_size=batch_size, num_workers=workers or torch.get_num_threads(),
                             order=OrderOption.RANDOM, seed=0, drop_last=False, os_cache=True, pipelines={
                                 "image": [decoder, ToTensor(), ToDevice(device, non_blocking),
                                           ToTorchImage(channels_last=False)],
                                 "label": [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking)]})

    def epoch(self, seed: int, indices=None):
        if indices is not None:  # config validation refuses a data schedule with this loader
            raise ValueError("the .beton loader streams every image; a data schedule needs data.loader tensor")
        # FFCV draws the order from its traversal's seed + next_epoch, an additive pattern; one loader
        # serves every expert (building one compiles its pipeline), so the whole seed is set per call.
        self.loader.traversal_order.seed, self.loader.next_epoch = seed, 0
        return self.loader
