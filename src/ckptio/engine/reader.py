"""One weights file opened for reading, whatever its format, read whole or by boxes.

The same reader serves a one-process load (whole tensors straight into the live ones) and a
rank of a resharding load (only the bytes of the box that rank holds). safetensors files are
read with ``preadv`` at the offsets of the validated header, so a box costs only its own bytes
when its contiguous runs are long (``Shard(0)`` rows), and whole rows of its range otherwise;
``torch.save`` files are memory-mapped and loaded with ``weights_only=True``, then sliced.

A folder written by ``torch.distributed.checkpoint.save`` is opened through its ``.metadata``
(:class:`DcpFile`, what ``TensorFile(".../.metadata")`` returns): its tensors are split into
chunks across ``.distcp`` files, and a box is read from each chunk it overlaps, the same way
(``preadv`` of the chunk's raw bytes, located without unpickling them: :mod:`ckptio.formats.dcp`).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptio.engine.tensors import Region
from ckptio.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError
from ckptio.formats import dcp, extra_state, naming, safetensors_format, sniff, torch_format
from ckptio.formats.safetensors_format import ParsedHeader, TensorInfo, tensor_bytes
from ckptio.layouts import dcp as dcp_layout
from ckptio.storage import reading

_RUN_BYTES = 4096  # strided runs shorter than this are read as whole rows instead (fewer syscalls)
_BLOCK_BYTES = 64 * 1024 * 1024
try:
    _IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError, AttributeError):  # pragma: no cover
    _IOV_MAX = 16

Shapes = dict[str, tuple[torch.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class FileHeader:
    """The tensors of one weights file as its header gives them, modules' extra state held there
    (not tensors), and for safetensors the parsed header itself, which a later
    :class:`TensorFile` of the same unchanged file reuses."""

    shapes: Shapes
    parsed: ParsedHeader | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [1] * len(shape), 1
    for d in range(len(shape) - 1, -1, -1):
        strides[d] = acc
        acc *= shape[d]
    return strides


def _pread_exact(source, view: memoryview, offset: int, path: str) -> None:
    safetensors_format.read_exact(source, offset, view, path)


def _read_run(source, views: list[memoryview], offset: int, path: str) -> None:
    """Fill ``views`` from consecutive bytes at ``offset``: one ``preadv`` of a local file (unless
    the kernel reads short); a store's object, one ranged read per view (never one buffer the size
    of the whole run)."""
    if not isinstance(source, safetensors_format.LocalFile):
        for view in views:
            _pread_exact(source, view, offset, path)
            offset += len(view)
        return
    first, end = 0, offset + sum(len(v) for v in views)
    while first < len(views):
        n = os.preadv(source.fd, views[first:], offset)
        if n <= 0:
            raise CheckpointCorruptError(f"file ends before byte {end}", path=path)
        offset += n
        while first < len(views) and n >= len(views[first]):
            n -= len(views[first])
            first += 1
        if n:
            views[first] = views[first][n:]


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


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether a weights file is safetensors: by its bytes, or a placeholder of a store's object
    (empty here, read by byte ranges: only safetensors files are)."""
    return reading.remote_object(path) is not None or sniff.is_safetensors_file(path)


class TensorFile:
    """A weights file (safetensors or ``torch.save``) opened once; the header is validated on open.
    A DCP folder's ``.metadata`` opens as a :class:`DcpFile` (its model's tensors)."""

    def __new__(cls, path: str | os.PathLike, *args: Any, **kwargs: Any) -> TensorFile:
        if cls is TensorFile and Path(path).name == naming.DCP_METADATA:
            cls = DcpFile
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike, header: FileHeader | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointNotFoundError("weights file named by the checkpoint is missing", path=self.path)
        parsed = header.parsed if header is not None else None
        st = parsed is not None or is_safetensors(self.path)
        source = reading.open_source(self.path) if st else None
        self._st = safetensors_format.SafetensorsReader.open(self.path, source, parsed) if st else None
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

    def header(self) -> FileHeader:
        return FileHeader(self.shapes(), self._st.parsed if self._st is not None else None, self.extra_state())

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
                    _read_run(self._st.source, views, start, str(self.path))
                    views = []
                if not views:
                    start = info.start
                views.append(tensor_bytes(dest))
                end = info.end
            if views:
                _read_run(self._st.source, views, start, str(self.path))
        except CheckpointError:
            raise
        except (OSError, RuntimeError) as exc:
            raise CheckpointCorruptError(f"reading tensors failed: {exc}", path=self.path) from exc

    def close(self) -> None:
        if self._st is not None:
            self._st.close()
        self._torch = None


def _overlap(region: Region, chunk: dcp.Chunk) -> Region | None:
    """The part of ``region`` (a box of the full tensor) that ``chunk`` holds, if any."""
    offset, shape = [], []
    for ro, rs, co, cs in zip(region.offset, region.shape, chunk.offsets, chunk.sizes):
        lo, hi = max(ro, co), min(ro + rs, co + cs)
        if hi <= lo:
            return None
        offset.append(lo)
        shape.append(hi - lo)
    return Region(tuple(offset), tuple(shape))


class DcpFile(TensorFile):
    """The tensors of a ``torch.distributed.checkpoint`` folder, opened through its ``.metadata``:
    the model's, named as the model names them (:func:`ckptio.layouts.dcp.model_keys`), or with
    ``all_keys=True`` every entry under its DCP key. A box is read from the chunks it overlaps,
    each with ``preadv`` of only the box's bytes (whole rows for short runs, like safetensors);
    the chunks' zip headers are parsed once per chunk, on first use, and no data is unpickled.
    Safe to read from several threads."""

    def __init__(self, path: str | os.PathLike, header: FileHeader | None = None, *, all_keys: bool = False) -> None:
        self.path = Path(path)
        self._st = None  # no safetensors file: whole tensors are read box by box
        self.meta = dcp.read_metadata(self.path)
        every = (*self.meta.tensors, *self.meta.values)
        self.names = {k: k for k in every} if all_keys else dcp_layout.model_keys(self.meta)
        self._fds: dict[str, safetensors_format.LocalFile] = {}
        self._raw: dict[tuple[str, int], dcp.RawTensor] = {}
        self._lock = threading.Lock()

    @property
    def format(self) -> str:
        return "dcp"

    def _file(self, name: str) -> safetensors_format.LocalFile:
        """A data file opened once, read at offsets (no shared position: threads share it)."""
        with self._lock:
            opened = self._fds.get(name)
            if opened is None:
                path = self.meta.folder / name
                if not path.is_file():
                    raise CheckpointNotFoundError("data file named by .metadata is missing", path=path)
                opened = self._fds[name] = safetensors_format.LocalFile(path)
            return opened

    def _fd(self, name: str) -> int:
        return self._file(name).fd

    def _entry(self, key: str) -> dcp.TensorEntry:
        entry = self.meta.tensors.get(self.names.get(key, ""))
        if entry is None:
            raise KeyError(key)
        return entry

    def _located(self, entry: dcp.TensorEntry, i: int) -> dcp.RawTensor:
        raw = self._raw.get((entry.key, i))
        if raw is None:
            chunk = entry.chunks[i]
            fd = self._fd(chunk.file)
            raw = dcp.locate_tensor(fd, chunk, entry.dtype, key=entry.key, path=self.meta.folder / chunk.file)
            self._raw[(entry.key, i)] = raw
        return raw

    def header(self) -> FileHeader:
        return FileHeader(self.shapes(), None, self.extra_state())

    def shapes(self) -> Shapes:
        tensors = self.meta.tensors
        return {name: (tensors[k].dtype, tensors[k].shape) for name, k in self.names.items() if k in tensors}

    def in_file_order(self, keys: list[str]) -> list[str]:
        def where(key: str) -> tuple[str, int]:
            return min(((c.file, c.offset) for c in self._entry(key).chunks), default=("", 0))

        return sorted(keys, key=where)

    def extra_state(self) -> dict[str, Any]:
        """Modules' extra state saved as values (``<module>._extra_state``), read as plain values."""
        return {
            name: self.value(name)
            for name, k in self.names.items()
            if k in self.meta.values and name.endswith(naming.EXTRA_STATE_SUFFIX)
        }

    def value(self, key: str) -> Any:
        """An entry that is not a tensor, unpickled without globals; a tensor entry is read whole."""
        dcp_key = self.names[key]
        if dcp_key in self.meta.tensors:
            return self.read(key)
        entry = self.meta.values[dcp_key]
        return dcp.read_value(self._fd(entry.file), entry, path=self.meta.folder / entry.file)

    def read(self, key: str) -> torch.Tensor:
        entry = self._entry(key)
        out = torch.empty(entry.shape, dtype=entry.dtype)
        self.read_box(key, Region((0,) * len(entry.shape), entry.shape), out)
        return out

    def read_box(self, key: str, region: Region, dest: torch.Tensor) -> None:
        entry = self._entry(key)
        try:
            direct = dest.device.type == "cpu" and dest.is_contiguous() and type(dest) is torch.Tensor
            out = dest if direct and dest.dtype == entry.dtype else torch.empty(region.shape, dtype=entry.dtype)
            for i, chunk in enumerate(entry.chunks):
                part = _overlap(region, chunk)
                if part is None or not part.numel:
                    continue
                raw = self._located(entry, i)
                inside = Region(tuple(p - c for p, c in zip(part.offset, chunk.offsets)), part.shape)
                if part.shape == region.shape:
                    self._read_chunk_box(raw, entry.dtype, inside, out)  # one chunk holds the whole box
                    continue
                piece = torch.empty(part.shape, dtype=entry.dtype)
                self._read_chunk_box(raw, entry.dtype, inside, piece)
                out[tuple(slice(p - r, p - r + s) for p, r, s in zip(part.offset, region.offset, part.shape))] = piece
            if out is not dest:
                dest.copy_(out)
        except CheckpointError:
            raise
        except (OSError, RuntimeError) as exc:
            raise CheckpointCorruptError(f"reading tensor {key!r} failed: {exc}", path=self.path) from exc

    def _read_chunk_box(self, raw: dcp.RawTensor, dtype: torch.dtype, inside: Region, out: torch.Tensor) -> None:
        header, fd, path = raw.header, self._file(raw.file), str(self.meta.folder / raw.file)
        if header.contiguous:
            start = raw.start + header.storage_offset * dtype.itemsize
            info = TensorInfo(dtype, header.shape, start, start + math.prod(header.shape) * dtype.itemsize)
            read_safetensors_box(path, fd, info, inside, out)
            return
        storage = torch.empty(header.storage_numel, dtype=dtype)  # a strided chunk (a saved view): read it whole
        _pread_exact(fd, tensor_bytes(storage), raw.start, path)
        view = storage.as_strided(header.shape, header.stride, header.storage_offset)
        out.copy_(view[inside.index()])

    def close(self) -> None:
        with self._lock:
            for opened in self._fds.values():
                opened.close()
            self._fds.clear()


def read_header(path: str | os.PathLike) -> FileHeader:
    """The dtype and shape of every tensor of one weights file (headers only), and the parsed
    header for a later :class:`TensorFile` of the same file."""
    with TensorFile(path) as tf:
        return tf.header()
