"""Where trajectories live: a local directory, or a shared filesystem / object store named by a URI.

`open_storage("runs/x")` gives local files (pure Python, so the algorithm still runs on a box that
has only torch); `open_storage("s3://bucket/x")`, `gs://...` or `file:///...` goes through
pyarrow's filesystems, the same layer Ray Train uses for its `storage_path`. Both offer the few
operations the trajectory store needs, and both write atomically: a reader sees an old file or a
complete new one, never a half-written one (temp file + rename on a filesystem; an object store
publishes an object only once its upload completes, so there it is one plain PUT: a rename would
be a copy plus a delete, uploading every snapshot twice).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from .errors import UserError


def is_uri(location: str) -> bool:
    return "://" in str(location)


class LocalStorage:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self, folder: str = "") -> list[str]:
        where = self._path(folder)
        return sorted(p.name for p in where.iterdir()) if where.is_dir() else []

    def read(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def open(self, name: str) -> BinaryIO:
        return open(self._path(name), "rb")

    def write(self, name: str, data: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def remove_folder(self, folder: str) -> None:
        shutil.rmtree(self._path(folder), ignore_errors=True)


OBJECT_STORES = {"s3", "gcs", "abfs"}  # pyarrow filesystems whose writes publish whole objects


class ArrowStorage:
    """A folder on any pyarrow filesystem (S3, GCS, HDFS, or file:// for a shared mount)."""

    def __init__(self, uri: str):
        try:
            from pyarrow import fs
        except ImportError:
            raise UserError(f"{uri} needs pyarrow (installed with ray); `pip install pyarrow`, or use a local path") from None
        try:
            self.fs, self.root = fs.FileSystem.from_uri(uri)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants for bad URIs
            raise UserError(f"cannot open storage {uri} ({str(e).splitlines()[0]}); check the URI and credentials") from None
        self.uri, self._fs_mod = uri, fs

    def __str__(self) -> str:
        return self.uri

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}" if name else self.root

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self._path(name)).type == self._fs_mod.FileType.File

    def list(self, folder: str = "") -> list[str]:
        infos = self.fs.get_file_info(self._fs_mod.FileSelector(self._path(folder), allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def read(self, name: str) -> bytes:
        with self.fs.open_input_file(self._path(name)) as f:
            return f.read()

    def open(self, name: str) -> BinaryIO:
        return self.fs.open_input_file(self._path(name))

    def write(self, name: str, data: bytes) -> None:
        path = self._path(name)
        if self.fs.type_name in OBJECT_STORES:
            with self.fs.open_output_stream(path) as f:
                f.write(data)
            return
        folder = path.rsplit("/", 1)[0]
        self.fs.create_dir(folder, recursive=True)
        tmp = f"{folder}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)

    def remove_folder(self, folder: str) -> None:
        path = self._path(folder)
        if self.fs.get_file_info(path).type == self._fs_mod.FileType.Directory:
            self.fs.delete_dir(path)


Storage = LocalStorage | ArrowStorage


def open_storage(location: str | Path) -> Storage:
    return ArrowStorage(str(location)) if is_uri(location) else LocalStorage(location)
