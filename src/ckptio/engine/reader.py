"""One weights file opened for reading, whatever its format, read whole or by boxes.

The same reader serves a one-process load (whole tensors straight into the live ones) and a
rank of a resharding load (only the bytes of the box that rank holds). safetensors files are
read with ``preadv`` at the offsets of the validated header, so a box costs only its own bytes
when its contiguous runs are long (``Shard(0)`` rows), and whole rows of its range otherwise;
``torch.save`` files are memory-mapped and loaded with ``weights_only=True``, then sliced.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from pathlib import Path
from typing import Any

import torch

from ckptio.engine.tensors import Region
from ckptio.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError
from ckptio.formats import extra_state, safetensors_format, torch_format
from ckptio.formats.safetensors_format import TensorInfo, tensor_bytes
from ckptio.storage.reading import open_source

_RUN_BYTES = 4096  # strided runs shorter than this are read as whole rows instead (fewer syscalls)
_BLOCK_BYTES = 64 * 1024 * 1024

Shapes = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def _strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [1] * len(shape), 1
    for d in range(len(shape) - 1, -1, -1):
        strides[d] = acc
        acc *= shape[d]
    return strides


def _pread_exact(source, view: memoryview, offset: int, path: str) -> None:
    safetensors_format.read_exact(source, offset, view, path)


def read_safetensors_box(path: str, fd, info: TensorInfo, region: Region, out: torch.Tensor) -> None:
    """Fill ``out`` (contiguous CPU, ``region.shape``) with the box, reading only its bytes
    when its contiguous runs are long, else whole rows of the box's dim-0 range in blocks."""
    shape = info.shape
    if not region.numel:
        return
    if not shape:
        _pread_exact(fd, tensor_bytes(out), info.start, path)
        return
    # k: the last dimension that is cut; dims after it are whole, so runs span dims k..end.
    k = 0
    for d in range(len(shape) - 1, -1, -1):
        if region.shape[d] != shape[d]:
            k = d
            break
    strides = _strides(shape)
    item = info.dtype.itemsize
    run_elems = region.shape[k] * strides[k]
    n_runs = math.prod(region.shape[:k])
    dest = tensor_bytes(out)
    if n_runs == 1 or run_elems * item >= _RUN_BYTES:
        run_bytes = run_elems * item
        for i, idx in enumerate(
            itertools.product(*(range(o, o + s) for o, s in zip(region.offset[:k], region.shape[:k])))
        ):
            elem = sum(a * b for a, b in zip(idx, strides[:k])) + region.offset[k] * strides[k]
            _pread_exact(fd, dest[i * run_bytes : (i + 1) * run_bytes], info.start + elem * item, path)
        return
    # Short runs: read the dim-0 rows of the box in bounded blocks and slice them.
    row_bytes = strides[0] * item
    rows_per_block = max(1, _BLOCK_BYTES // max(1, row_bytes))
    inner = tuple(slice(o, o + s) for o, s in zip(region.offset[1:], region.shape[1:]))
    start_row, stop_row = region.offset[0], region.offset[0] + region.shape[0]
    for row in range(start_row, stop_row, rows_per_block):
        end = min(stop_row, row + rows_per_block)
        block = torch.empty((end - row, *shape[1:]), dtype=info.dtype)
        _pread_exact(fd, tensor_bytes(block), info.start + row * row_bytes, path)
        out[row - start_row : end - start_row].copy_(block[(slice(None), *inner)])


class TensorFile:
    """A weights file (safetensors or ``torch.save``) opened once; the header is validated on open."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointNotFoundError("weights file named by the checkpoint is missing", path=self.path)
        st = safetensors_format.is_safetensors_file(self.path)
        self._st = safetensors_format.SafetensorsReader.open(self.path, open_source(self.path)) if st else None
        self._torch: dict[str, torch.Tensor] | None = None
        self._torch_extra: dict[str, Any] = {}

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def format(self) -> str:
        return "safetensors" if self._st is not None else "torch"

    def _torch_state(self) -> dict[str, torch.Tensor]:
        if self._torch is None:
            self._torch, self._torch_extra = torch_format.load_weights(self.path, mmap=True)
        return self._torch

    def extra_state(self) -> dict[str, Any]:
        """Modules' extra state held here that is not a tensor (:mod:`ckptio.formats.extra_state`):
        a safetensors file's metadata entry, or the values of a torch file."""
        if self._st is not None:
            text = self._st.metadata.get(extra_state.METADATA_KEY)
            return {} if text is None else extra_state.from_text(text, path=self.path)
        self._torch_state()
        return copy.deepcopy(self._torch_extra)  # tensors in it: copies, not views of the mapped file

    def shapes(self) -> Shapes:
        if self._st is not None:
            return {k: (i.dtype, i.shape) for k, i in self._st.tensors.items()}
        return {k: (t.dtype, tuple(t.shape)) for k, t in self._torch_state().items()}

    def in_file_order(self, keys: list[str]) -> list[str]:
        """``keys`` sorted by where their bytes sit, so a cold read is sequential."""
        if self._st is None:
            return list(keys)
        return sorted(keys, key=lambda k: self._st.tensors[k].start)

    def read(self, key: str) -> torch.Tensor:
        """The whole tensor, as a new CPU tensor."""
        if self._st is not None:
            info = self._st.info(key)
            out = torch.empty(info.shape, dtype=info.dtype)
            self.read_box(key, Region((0,) * len(info.shape), info.shape), out)
            return out
        return self._torch_state()[key]

    def read_box(self, key: str, region: Region, dest: torch.Tensor) -> None:
        """Copy the box ``region`` of tensor ``key`` into ``dest`` (of shape ``region.shape``,
        any device, layout or dtype: the values are cast, never the bytes reinterpreted); only
        the box's bytes are read from a safetensors file."""
        try:
            if self._st is not None:
                info = self._st.info(key)
                direct = (
                    dest.device.type == "cpu"
                    and dest.is_contiguous()
                    and type(dest) is torch.Tensor
                    and dest.dtype == info.dtype
                )
                out = dest if direct else torch.empty(region.shape, dtype=info.dtype)
                read_safetensors_box(str(self.path), self._st.source, info, region, out)
                if not direct:
                    dest.copy_(out)
                return
            full = self._torch_state()[key]
            dest.copy_(full[region.index()] if full.dim() else full)
        except CheckpointError:
            raise
        except (OSError, RuntimeError) as exc:
            raise CheckpointCorruptError(f"reading tensor {key!r} failed: {exc}", path=self.path) from exc

    def copy_into(self, key: str, dest: torch.Tensor) -> None:
        """Copy the whole tensor ``key`` into ``dest`` (same shape)."""
        self.read_box(key, Region((0,) * dest.dim(), tuple(dest.shape)), dest)

    def close(self) -> None:
        if self._st is not None:
            self._st.close()
        self._torch = None


def read_shapes(path: str | os.PathLike) -> Shapes:
    """The dtype and shape of every tensor of one weights file (headers only)."""
    with TensorFile(path) as tf:
        return tf.shapes()
