"""The expert trajectory store.

Layout of a store (a local directory or a URI, see storage.py):
    store.json                  what every trajectory in it was trained with (dataset, model, ZCA, ...)
    expert_0000.npy             float32 (epochs + 1, num_params): parameters at init and after each epoch
    expert_0000.json            written last, so its presence marks the expert complete: shape,
                                per-row CRC32, per-epoch test accuracy, seed
    expert_0003.partial/        an expert still in training: epoch_000.npy, epoch_000.json, ...

Every file is written atomically (storage.py), so a killed run leaves either the old state or the
new one, never half a file. Reads are lazy: `Trajectory.snapshot(e)` seeks to row e of the .npy
and reads only that row, so the distiller never holds whole experts in memory, on local disk or
on an object store alike.
"""
from __future__ import annotations

import io
import json
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .storage import Storage, open_storage

FORMAT_VERSION = 1
# Fields that must match between a store and the run that reads or extends it.
IDENTITY_KEYS = ("dataset", "model", "width", "depth", "zca", "val_per_class", "train_per_class", "num_params",
                 "optimizer", "data_schedule")
IDENTITY_DEFAULTS = {"optimizer": "sgd", "data_schedule": "none"}  # what a store written before a key was recorded holds


def write_json(storage: Storage, name: str, obj: dict) -> None:
    storage.write(name, json.dumps(obj, indent=1).encode())


def read_json(storage: Storage, name: str) -> dict:
    try:
        return json.loads(storage.read(name))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {storage}/{name} ({e}); delete it so the expert is retrained") from None


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _crc(row: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(row).view(np.uint8))


class Trajectory:
    """One finished expert: lazy, checksummed access to its per-epoch parameter snapshots."""

    def __init__(self, storage: Storage, name: str, info: dict):
        self.path, self.info = f"{storage}/{name}", info
        self._file = storage.open(name)
        try:
            version = np.lib.format.read_magic(self._file)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(self._file)
            self._offset = self._file.tell()
            size = self._file.seek(0, 2)
        except (OSError, ValueError, EOFError) as e:
            raise UserError(f"trajectory {self.path} is corrupt ({e}); delete it and its .json, then rerun "
                            f"`python -m ray_mtt.experts` to retrain that expert") from None
        self._row_bytes = int(np.prod(shape[1:])) * 4
        if (list(shape) != info["shape"] or dtype != np.float32 or fortran
                or size != self._offset + shape[0] * self._row_bytes):
            raise UserError(f"trajectory {self.path} is partial or corrupt (shape {shape}, {size} bytes; expected "
                            f"{info['shape']}); delete it and its .json, then rerun `python -m ray_mtt.experts`")
        self.num_snapshots = shape[0]

    def snapshot(self, epoch: int) -> torch.Tensor:
        self._file.seek(self._offset + epoch * self._row_bytes)
        row = np.frombuffer(bytearray(self._file.read(self._row_bytes)), dtype=np.float32)
        if _crc(row) != self.info["crc32"][epoch]:
            raise UserError(f"trajectory {self.path} epoch {epoch} fails its checksum; delete the file and its "
                            f".json, then rerun `python -m ray_mtt.experts`")
        return torch.from_numpy(row)


class TrajectoryStore:
    def __init__(self, root: str | Path):
        self.storage = open_storage(root)
        self.root = str(self.storage)

    # ----- store-level metadata
    def read_meta(self) -> dict:
        if not self.storage.exists("store.json"):
            raise UserError(f"no expert trajectories in {self.root}; train them first with "
                            f"`python -m ray_mtt.experts` (same --dataset/--model.name/--data.zca), "
                            f"or point --experts.dir at an existing store")
        return read_json(self.storage, "store.json")

    def init(self, meta: dict) -> None:
        """Create the store, or check that an existing one holds the same kind of experts."""
        if self.storage.exists("store.json"):
            check_compatible(self.read_meta(), meta, self.root)
        else:
            write_json(self.storage, "store.json", {"format_version": FORMAT_VERSION, **meta})

    # ----- finished experts
    def completed(self) -> list[int]:
        return sorted(int(m.group(1)) for m in map(re.compile(r"expert_(\d{4})\.json$").match, self.storage.list()) if m)

    def read_info(self, k: int) -> dict:
        return read_json(self.storage, f"expert_{k:04d}.json")

    def open(self, k: int) -> Trajectory:
        return Trajectory(self.storage, f"expert_{k:04d}.npy", self.read_info(k))

    # ----- experts in training
    def _epoch(self, k: int, epoch: int, ext: str) -> str:
        return f"expert_{k:04d}.partial/epoch_{epoch:03d}.{ext}"

    def unfinished(self, num_experts: int) -> list[int]:
        """Experts 0..num_experts-1 without a completion marker (one listing of the store)."""
        done = set(self.completed())
        return [k for k in range(num_experts) if k not in done]

    def saved_epoch_count(self, k: int) -> int:
        """Epochs saved so far, contiguous from 0, from one listing (no file reads)."""
        names = set(self.storage.list(f"expert_{k:04d}.partial"))
        count = 0
        while f"epoch_{count:03d}.npy" in names:
            count += 1
        return count

    def saved_epochs(self, k: int) -> list[dict]:
        """Metrics of the epochs saved so far (contiguous from 0); a rerun resumes after the last."""
        return [read_json(self.storage, self._epoch(k, e, "json")) for e in range(self.saved_epoch_count(k))]

    def load_epoch(self, k: int, epoch: int) -> torch.Tensor:
        return torch.from_numpy(np.load(io.BytesIO(self.storage.read(self._epoch(k, epoch, "npy")))))

    def save_epoch(self, k: int, epoch: int, flat: torch.Tensor, metrics: dict) -> None:
        write_json(self.storage, self._epoch(k, epoch, "json"), metrics)  # the .npy (written last) marks the epoch done
        row = flat.detach().to("cpu", torch.float32).numpy()
        self.storage.write(self._epoch(k, epoch, "npy"), npy_bytes(row))

    def save_progress(self, k: int, progress: dict) -> None:
        """How far expert k is within the epoch in flight (see experts.EpochProgress)."""
        write_json(self.storage, f"expert_{k:04d}.partial/progress.json", progress)

    def read_progress(self, k: int) -> dict | None:
        try:
            return json.loads(self.storage.read(f"expert_{k:04d}.partial/progress.json"))
        except (OSError, FileNotFoundError, json.JSONDecodeError):
            return None  # not written yet, or the expert just finished

    def finish(self, k: int, info: dict) -> None:
        """Assemble the saved epochs into one file, then write the .json that marks it complete."""
        epochs = self.saved_epochs(k)
        rows = np.stack([self.load_epoch(k, e).numpy() for e in range(len(epochs))]).astype(np.float32)
        self.storage.write(f"expert_{k:04d}.npy", npy_bytes(rows))
        write_json(self.storage, f"expert_{k:04d}.json", {**info, "shape": list(rows.shape),
                                                          "crc32": [_crc(r) for r in rows], "epochs": epochs})
        self.storage.remove_folder(f"expert_{k:04d}.partial")


def check_compatible(found: dict, wanted: dict, where: str) -> None:
    found = {**IDENTITY_DEFAULTS, **found}
    diffs = [f"{k}={found.get(k)!r} (wanted {wanted.get(k)!r})" for k in IDENTITY_KEYS
             if k in wanted and found.get(k) != wanted.get(k)]
    if diffs:
        raise UserError(f"experts in {where} were trained with {', '.join(diffs)}; use a matching config "
                        f"or another --experts.dir")
