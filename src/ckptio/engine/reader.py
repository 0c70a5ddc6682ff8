"""One weights file opened for reading, whatever its format, read whole or by boxes.

The same reader serves a one-process load (whole tensors straight into the live ones) and a
rank of a resharding load (only the bytes of the box that rank holds). safetensors files are
read with ``preadv`` at the offsets of the validated header, so a box costs only its own bytes
when its contiguous runs are long (``Shard(0)`` rows), and whole rows of its range otherwise;
``torch.save`` files are memory-mapped and loaded with ``weights_only=True``, then sliced.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptio.engine.tensors import Region
from ckptio.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError
from ckptio.formats import safetensors_format, sniff, torch_format
from ckptio.formats.safetensors_format import ParsedHeader, TensorInfo, tensor_bytes

_RUN_BYTES = 4096  # strided runs shorter than this are read as whole rows instead (fewer syscalls)
_BLOCK_BYTES = 64 * 1024 * 1024
try:
    _IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError, AttributeError):  # pragma: no cover
    _IOV_MAX = 16

Shapes = dict[str, tuple[torch.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class FileHeader:
    """The tensors of one weights file as its header gives them and, for safetensors, the parsed
    header itself, which a later :class:`TensorFile` of the same unchanged file reuses."""

    shapes: Shapes
    parsed: ParsedHeader | None = None


def _strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [1] * len(shape), 1
    for d in range(len(shape) - 1, -1, -1):
        strides[d] = acc
        acc *= shape[d]
    return strides


def _pread_exact(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointCorruptError(f"file ends before byte {offset + len(view)}", path=path)
        done += n


def _preadv_exact(fd: int, views: list[memoryview], offset: int, path: str) -> None:
    """Fill ``views`` from consecutive bytes at ``offset`` (one syscall unless the kernel reads short)."""
    first, end = 0, offset + sum(len(v) for v in views)
    while first < len(views):
        n = os.preadv(fd, views[first:], offset)
        if n <= 0:
            raise CheckpointCorruptError(f"file ends before byte {end}", path=path)
        offset += n
        while first < len(views) and n >= len(views[first]):
            n -= len(views[first])
            first += 1
        if n:
            views[first] = views[first][n:]


def read_safetensors_box(path: str, fd: int, info: TensorInfo, region: Region, out: torch.Tensor) -> None:
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

    def __init__(self, path: str | os.PathLike, header: FileHeader | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointNotFoundError("weights file named by the checkpoint is missing", path=self.path)
        parsed = header.parsed if header is not None else None
        st = parsed is not None or sniff.is_safetensors_file(self.path)
        self._st = safetensors_format.SafetensorsReader.open(self.path, parsed) if st else None
        self._torch: dict[str, torch.Tensor] | None = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def format(self) -> str:
        return "safetensors" if self._st is not None else "torch"

    def _torch_state(self) -> dict[str, torch.Tensor]:
        if self._torch is None:
            self._torch = torch_format.load_tensor_dict(self.path, mmap=True)
        return self._torch

    def shapes(self) -> Shapes:
        if self._st is not None:
            return {k: (i.dtype, i.shape) for k, i in self._st.tensors.items()}
        return {k: (t.dtype, tuple(t.shape)) for k, t in self._torch_state().items()}

    def header(self) -> FileHeader:
        return FileHeader(self.shapes(), self._st.parsed if self._st is not None else None)

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
        any device or layout); only the box's bytes are read from a safetensors file."""
        try:
            if self._st is not None:
                direct = dest.device.type == "cpu" and dest.is_contiguous() and type(dest) is torch.Tensor
                out = dest if direct else torch.empty(region.shape, dtype=dest.dtype)
                read_safetensors_box(str(self.path), self._st.fileno(), self._st.info(key), region, out)
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

    def copy_all(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """Copy whole tensors into ``dest`` tensors of their shape, in file order.

        Tensors that sit back to back in a safetensors file and land in plain contiguous CPU
        tensors are read by one ``preadv`` per run (at most ``IOV_MAX`` of them), straight into
        their memory: loading 5,000 small tensors costs a few syscalls, not 5,000.
        """
        if self._st is None:
            for key, dest in pairs:
                self.copy_into(key, dest)
            return
        infos = self._st.tensors
        views: list[memoryview] = []
        start = end = 0
        try:
            for key, dest in sorted(pairs, key=lambda kv: infos[kv[0]].start):
                info = infos[key]
                direct = (
                    type(dest) is torch.Tensor
                    and dest.device.type == "cpu"
                    and dest.is_contiguous()
                    and dest.dtype == info.dtype
                    and tuple(dest.shape) == info.shape
                )
                if not direct:
                    self.copy_into(key, dest)
                    continue
                if not info.nbytes:
                    continue
                if views and (info.start != end or len(views) >= _IOV_MAX):
                    _preadv_exact(self._st.fileno(), views, start, str(self.path))
                    views = []
                if not views:
                    start = info.start
                views.append(tensor_bytes(dest))
                end = info.end
            if views:
                _preadv_exact(self._st.fileno(), views, start, str(self.path))
        except CheckpointError:
            raise
        except (OSError, RuntimeError) as exc:
            raise CheckpointCorruptError(f"reading tensors failed: {exc}", path=self.path) from exc

    def close(self) -> None:
        if self._st is not None:
            self._st.close()
        self._torch = None


def read_header(path: str | os.PathLike) -> FileHeader:
    """The dtype and shape of every tensor of one weights file (headers only), and the parsed
    header for a later :class:`TensorFile` of the same file."""
    with TensorFile(path) as tf:
        return tf.header()
