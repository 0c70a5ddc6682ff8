"""A model checkpoint's tensors seen from their headers, read one at a time on request."""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import torch

from ckptio.engine.reader import TensorFile
from ckptio.engine.tensors import Region
from ckptio.formats.dtypes import element_size
from ckptio.layouts.detect import Located, detect


@dataclass(frozen=True)
class TensorEntry:
    key: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


class ModelView:
    """The files and tensor headers of a model checkpoint (any layout we read); tensors are
    read one at a time, each file opened once and released when asked."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.located: Located = detect(self.path, "model")
        self.tensors: dict[str, TensorEntry] = {}
        self.file_formats: dict[str, str] = {}
        self._open: dict[str, TensorFile] = {}
        self._lock = threading.Lock()  # convert reads from two writer threads
        for name in self.located.weight_files:
            with TensorFile(self.located.folder / name) as tf:
                shapes = tf.shapes()
                self.file_formats[name] = tf.format
            for key, (dtype, shape) in shapes.items():
                self.tensors[key] = TensorEntry(key, name, dtype, tuple(shape))

    def __enter__(self) -> ModelView:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def format(self) -> str:
        kinds = sorted(set(self.file_formats.values()))
        return kinds[0] if len(kinds) == 1 else "mixed"

    @property
    def files(self) -> tuple[str, ...]:
        return self.located.weight_files

    def file_size(self, name: str) -> int:
        if self.file_formats.get(name) == "dcp":  # .metadata stands for the whole folder's data files
            return sum((self.located.folder / f).stat().st_size for f in self.located.files)
        return (self.located.folder / name).stat().st_size

    def _file(self, name: str) -> TensorFile:
        with self._lock:
            tf = self._open.get(name)
            if tf is None:
                tf = self._open[name] = TensorFile(self.located.folder / name)
        return tf

    def read(self, key: str) -> torch.Tensor:
        return self._file(self.tensors[key].file).read(key)

    def read_box(self, key: str, region: Region, out: torch.Tensor) -> None:
        """Copy the box ``region`` of tensor ``key`` into ``out`` (contiguous, ``region.shape``)."""
        self._file(self.tensors[key].file).read_box(key, region, out)

    def reads_boxes(self, key: str) -> bool:
        """Whether a box of ``key`` costs only its own bytes (files read by offset, not mapped whole)."""
        return self.file_formats[self.tensors[key].file] in ("safetensors", "dcp")

    def release(self, name: str) -> None:
        with self._lock:
            tf = self._open.pop(name, None)
        if tf is not None:
            tf.close()

    def close(self) -> None:
        for name in list(self._open):
            self.release(name)

    def keys_in_file_order(self) -> list[str]:
        order = {name: i for i, name in enumerate(self.files)}
        return sorted(self.tensors, key=lambda k: order[self.tensors[k].file])
