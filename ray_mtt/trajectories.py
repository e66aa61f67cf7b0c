"""The expert trajectory store.

Layout of a store directory:
    store.json                  what every trajectory in it was trained with (dataset, model, ZCA, ...)
    expert_0000.npy             float32 (epochs + 1, num_params): parameters at init and after each epoch
    expert_0000.json            written last, so its presence marks the expert complete: shape,
                                per-row CRC32, per-epoch test accuracy, seed
    expert_0003.partial/        an expert still in training: epoch_000.npy, epoch_000.json, ...

Every file is written to a temporary name and renamed into place, so a killed run leaves either
the old state or the new one, never half a file. Reads are lazy: `Trajectory.snapshot(e)`
memory-maps the .npy and reads one row, so the distiller never holds whole experts in memory.
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import UserError

FORMAT_VERSION = 1
# Fields that must match between a store and the run that reads or extends it.
IDENTITY_KEYS = ("dataset", "model", "width", "depth", "zca", "val_per_class", "train_per_class", "num_params")


def atomic_write(path: Path, write: Callable[[object], None], mode: str = "wb") -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=1), mode="w")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); delete it so the expert is retrained") from None


def _crc(row: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(row).view(np.uint8))


class Trajectory:
    """One finished expert: lazy, checksummed access to its per-epoch parameter snapshots."""

    def __init__(self, npy: Path, info: dict):
        self.path, self.info = npy, info
        try:
            self._rows = np.load(npy, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise UserError(f"trajectory {npy} is corrupt ({e}); delete it and its .json, then rerun "
                            f"`python -m ray_mtt.experts` to retrain that expert") from None
        if list(self._rows.shape) != info["shape"] or self._rows.dtype != np.float32:
            raise UserError(f"trajectory {npy} has shape {self._rows.shape}, expected {info['shape']}; it is partial "
                            f"or corrupt: delete it and its .json, then rerun `python -m ray_mtt.experts`")

    @property
    def num_snapshots(self) -> int:
        return self._rows.shape[0]

    def snapshot(self, epoch: int) -> torch.Tensor:
        row = np.array(self._rows[epoch])  # copy out of the memory map
        if _crc(row) != self.info["crc32"][epoch]:
            raise UserError(f"trajectory {self.path} epoch {epoch} fails its checksum; delete the file and its "
                            f".json, then rerun `python -m ray_mtt.experts`")
        return torch.from_numpy(row)


class TrajectoryStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ----- store-level metadata
    @property
    def meta_path(self) -> Path:
        return self.root / "store.json"

    def read_meta(self) -> dict:
        if not self.meta_path.is_file():
            raise UserError(f"no expert trajectories in {self.root}; train them first with "
                            f"`python -m ray_mtt.experts` (same --dataset/--model.name/--data.zca), "
                            f"or point --experts.dir at an existing store")
        return read_json(self.meta_path)

    def init(self, meta: dict) -> None:
        """Create the store, or check that an existing one holds the same kind of experts."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.meta_path.is_file():
            check_compatible(self.read_meta(), meta, self.root)
        else:
            write_json(self.meta_path, {"format_version": FORMAT_VERSION, **meta})

    # ----- finished experts
    def _npy(self, k: int) -> Path:
        return self.root / f"expert_{k:04d}.npy"

    def _info(self, k: int) -> Path:
        return self.root / f"expert_{k:04d}.json"

    def completed(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.root.glob("expert_[0-9][0-9][0-9][0-9].json"))

    def read_info(self, k: int) -> dict:
        return read_json(self._info(k))

    def open(self, k: int) -> Trajectory:
        return Trajectory(self._npy(k), self.read_info(k))

    # ----- experts in training
    def _partial(self, k: int) -> Path:
        return self.root / f"expert_{k:04d}.partial"

    def saved_epochs(self, k: int) -> list[dict]:
        """Metrics of the epochs saved so far (contiguous from 0); a rerun resumes after the last."""
        done = []
        while (self._partial(k) / f"epoch_{len(done):03d}.npy").is_file():
            done.append(read_json(self._partial(k) / f"epoch_{len(done):03d}.json"))
        return done

    def load_epoch(self, k: int, epoch: int) -> torch.Tensor:
        return torch.from_numpy(np.load(self._partial(k) / f"epoch_{epoch:03d}.npy"))

    def save_epoch(self, k: int, epoch: int, flat: torch.Tensor, metrics: dict) -> None:
        folder = self._partial(k)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"epoch_{epoch:03d}.json", metrics)  # the .npy (written last) marks the epoch done
        row = flat.detach().to("cpu", torch.float32).numpy()
        atomic_write(folder / f"epoch_{epoch:03d}.npy", lambda f: np.save(f, row))

    def finish(self, k: int, info: dict) -> None:
        """Assemble the saved epochs into one file, then write the .json that marks it complete."""
        epochs = self.saved_epochs(k)
        rows = np.stack([self.load_epoch(k, e).numpy() for e in range(len(epochs))]).astype(np.float32)
        atomic_write(self._npy(k), lambda f: np.save(f, rows))
        write_json(self._info(k), {**info, "shape": list(rows.shape), "crc32": [_crc(r) for r in rows],
                                   "epochs": [e for e in epochs]})
        shutil.rmtree(self._partial(k), ignore_errors=True)


def check_compatible(found: dict, wanted: dict, where: Path) -> None:
    diffs = [f"{k}={found.get(k)!r} (wanted {wanted.get(k)!r})" for k in IDENTITY_KEYS
             if k in wanted and found.get(k) != wanted.get(k)]
    if diffs:
        raise UserError(f"experts in {where} were trained with {', '.join(diffs)}; use a matching config "
                        f"or another --experts.dir")
