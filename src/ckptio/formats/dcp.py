"""Folders written by ``torch.distributed.checkpoint.save`` (DCP), read without running pickled code.

What ``dcp.save`` writes (torch 2.13, ``FileSystemWriter`` with its default
``SerializationFormat.TORCH_SAVE``; ``torch/distributed/checkpoint/filesystem.py``):

* ``.metadata``: a pickled ``Metadata``. For every key of the flattened state dict a
  ``TensorStorageMetadata`` (dtype, full shape, chunks: boxes given as offsets + sizes) or a
  ``BytesStorageMetadata`` (any other value); ``storage_data``, each chunk
  (``MetadataIndex(fqn, offsets)``) -> ``_StorageInfo(relative_path, offset, length)``; and
  ``planner_data``, each key's path in the nested state dict that was saved
  (``"optim.state.0.weight.exp_avg"`` -> ``("optim", "state", "0.weight", "exp_avg")``).
* ``__<rank>_<n>.distcp``: the chunks back to back, each the bytes of a ``torch.save`` of that
  chunk (a zip archive whose ``data/<key>`` record holds the raw tensor bytes, stored, never
  compressed) or of the value.

How it is read here:

* ``.metadata`` through an unpickler whose ``find_class`` turns DCP's metadata classes into inert
  records (and ``torch.float32`` and the like into torch's dtypes) and refuses every other global
  (:class:`~ckptio.errors.UnsafeCheckpointError`); the records are then checked into the plain
  :class:`Metadata` below: types, bounds, file names inside the folder, chunks that tile each
  tensor exactly.
* A chunk's ``data.pkl`` is never unpickled (:mod:`ckptio.formats.torch_archive`): its opcodes
  are parsed into a symbolic call that must rebuild one plain tensor of the metadata's dtype and
  shape, and the raw bytes of its storage record are located from the zip's central directory,
  so a reader ``pread`` s only the bytes of the box it needs.
* A value's pickle (an optimizer's ``lr``, ``betas``, its ``params`` names) is read with
  :mod:`ckptio.formats.plain_pickle`, which refuses every global.

Refused with a reason: data files written with ``SerializationFormat.SAFETENSORS`` (their
``.metadata`` offsets are not byte positions, and torch 2.13's ``FileSystemReader`` cannot read
them either) and chunks written through stream transforms (``_extensions``, e.g. zstd).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptio.errors import CheckpointCorruptError, CheckpointFormatError, CheckpointNotFoundError, UnsafeCheckpointError
from ckptio.formats import plain_pickle
from ckptio.formats.hf_index import check_relative_name
from ckptio.formats.torch_archive import TensorHeader, open_archive, record_start, small_record, tensor_header


# ----------------------------------------------------------------------------- what .metadata says
@dataclass(frozen=True)
class Chunk:
    """One box of a tensor as one rank saved it, and where its ``torch.save`` bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class TensorEntry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class ValueEntry:
    """A value that is not a tensor, ``torch.save`` d whole into ``file`` at ``offset``."""

    key: str
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class Metadata:
    """A DCP checkpoint's ``.metadata``, checked. ``paths``: each key's path in the saved state
    dict (``(key,)`` when the checkpoint does not record one)."""

    path: Path
    tensors: dict[str, TensorEntry]
    values: dict[str, ValueEntry]
    paths: dict[str, tuple[str | int, ...]]
    files: tuple[str, ...]

    @property
    def folder(self) -> Path:
        return self.path.parent

    def path_of(self, key: str) -> tuple[str | int, ...]:
        return self.paths.get(key, (key,))


# ----------------------------------------------------------------------------- the restricted unpickler
class _Record:
    """Stands in for one of DCP's metadata classes: keeps what the pickle hands it, runs nothing."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:  # (__dict__, __slots__ values)
                self.__dict__.update(part or {})
        else:
            self.state = state


_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_RECORDS: dict[tuple[str, str], type] = {
    (module, name): type(name, (_Record,), {})
    for module, names in (
        (
            _METADATA_MODULE,
            (
                "Metadata",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "MetadataIndex",
                "StorageMeta",
                "_MEM_FORMAT_ENCODING",
            ),
        ),
        ("torch.distributed.checkpoint.filesystem", ("_StorageInfo",)),
    )
    for name in names
}
_PATH_CLASSES = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path", "PurePath"}


def _record(name: str) -> type:
    return _RECORDS[(_METADATA_MODULE, name)]


def _as_tuple(*args: Any) -> tuple:
    return tuple(args[0]) if args else ()


def _as_text_path(*parts: Any) -> str:
    return "/".join(str(p) for p in parts)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        record = _RECORDS.get((module, name))
        if record is not None:
            return record
        if module == "torch":
            if name == "Size":
                return _as_tuple
            value = vars(torch).get(name)  # never torch.__getattr__, which imports submodules by name
            if isinstance(value, torch.dtype | torch.layout | torch.memory_format):
                return value
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _as_text_path  # TensorProperties.layout (torch.strided): deprecated, kept as its name
        if module in ("pathlib", "pathlib._local") and name in _PATH_CLASSES:
            return _as_text_path  # StorageMeta.checkpoint_id: kept as text, never used
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        raise pickle.UnpicklingError(f"global {module}.{name}")


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise CheckpointNotFoundError("DCP .metadata does not exist", path=path) from None
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if text.startswith("global "):
            raise UnsafeCheckpointError(
                f"refused to unpickle: it references {text.removeprefix('global ')}, and only "
                "torch.distributed.checkpoint's metadata classes are read from a DCP .metadata",
                path=path,
            ) from None
        raise CheckpointFormatError(f"not a valid DCP .metadata pickle: {exc}", path=path) from exc
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, RecursionError) as exc:
        raise CheckpointFormatError(f"not a valid DCP .metadata pickle: {exc!r}", path=path) from exc


# ----------------------------------------------------------------------------- checking what it built
def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.__dict__.get(name, default) if isinstance(obj, _Record) else default


def _ints(value: Any, what: str, path: Path) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(type(v) is int and v >= 0 for v in value):
        raise CheckpointFormatError(f"{what} must be a tuple of non-negative integers, found {value!r}", path=path)
    return tuple(value)


def _dtype_of(properties: Any, key: str, path: Path) -> torch.dtype:
    state = _field(properties, "state")
    dtype = state[0] if isinstance(state, tuple) and state else _field(properties, "dtype")
    if not isinstance(dtype, torch.dtype):
        raise CheckpointFormatError(f"tensor {key!r} has no dtype in the metadata (found {dtype!r})", path=path)
    return dtype


def _storage_info(info: Any, what: str, path: Path) -> tuple[str, int, int]:
    if not isinstance(info, _RECORDS[("torch.distributed.checkpoint.filesystem", "_StorageInfo")]):
        raise CheckpointFormatError(
            f"{what} is stored by an unknown storage writer ({type(info).__name__}); only FileSystemWriter's "
            "folders are read",
            path=path,
        )
    name = check_relative_name(_field(info, "relative_path"), path=str(path))
    offset, length = _field(info, "offset"), _field(info, "length")
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise CheckpointFormatError(f"{what} has a bad byte range ({offset!r}, {length!r})", path=path)
    if _field(info, "transform_descriptors"):
        raise CheckpointFormatError(
            f"{what} was written through stream transforms {_field(info, 'transform_descriptors')!r} "
            "(FileSystemWriter _extensions, e.g. compression): not supported",
            path=path,
        )
    return name, offset, length


def _check_tiling(key: str, shape: tuple[int, ...], chunks: list[Chunk], path: Path) -> None:
    """Chunks inside the tensor, not overlapping, covering every element: each element is
    read from exactly one chunk, so no box read can leave bytes unset."""
    for c in chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
            raise CheckpointFormatError(f"a chunk of {key!r} has a different rank than its shape {shape}", path=path)
        if any(o + s > d for o, s, d in zip(c.offsets, c.sizes, shape)):
            raise CheckpointFormatError(f"a chunk of {key!r} ({c.offsets} + {c.sizes}) is outside {shape}", path=path)
    covered, total = sum(c.numel for c in chunks), math.prod(shape)
    boxes = sorted((c for c in chunks if c.numel), key=lambda c: c.offsets[0] if shape else 0)
    active: list[Chunk] = []
    for c in boxes:  # a sweep along dim 0: only boxes whose rows overlap are compared
        if shape:
            active = [a for a in active if a.offsets[0] + a.sizes[0] > c.offsets[0]]
        for a in active:
            if all(ao < co + cs and co < ao + as_ for ao, as_, co, cs in zip(a.offsets, a.sizes, c.offsets, c.sizes)):
                raise CheckpointFormatError(f"two chunks of {key!r} overlap ({a.offsets}, {c.offsets})", path=path)
        active.append(c)
    if covered != total:
        raise CheckpointCorruptError(f"the chunks of {key!r} hold {covered} of its {total} elements", path=path)


def _planner_paths(planner: Any, path: Path) -> dict[str, tuple[str | int, ...]]:
    if planner is None:
        return {}
    ok = isinstance(planner, dict) and all(
        isinstance(k, str) and isinstance(v, tuple | list) and v and all(type(s) in (str, int) for s in v)
        for k, v in planner.items()
    )
    if not ok:
        raise CheckpointFormatError("planner_data must map every key to its path in the saved state dict", path=path)
    return {k: tuple(v) for k, v in planner.items()}


def _checked(root: Any, path: Path) -> Metadata:
    if not isinstance(root, _record("Metadata")):
        raise CheckpointFormatError(f"holds a {type(root).__name__}, not DCP's Metadata", path=path)
    described, storage = _field(root, "state_dict_metadata"), _field(root, "storage_data")
    if not isinstance(described, dict) or not isinstance(storage, dict):
        raise CheckpointFormatError("Metadata lacks state_dict_metadata or storage_data", path=path)
    where: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    for index, info in storage.items():
        fqn, offsets = _field(index, "fqn"), _field(index, "offset")
        if not isinstance(index, _record("MetadataIndex")) or not isinstance(fqn, str):
            raise CheckpointFormatError(f"storage_data key {index!r} is not a MetadataIndex", path=path)
        where[(fqn, None if offsets is None else _ints(offsets, f"offset of {fqn!r}", path))] = info
    tensors: dict[str, TensorEntry] = {}
    values: dict[str, ValueEntry] = {}
    for key, entry in described.items():
        if not isinstance(key, str):
            raise CheckpointFormatError(f"state_dict_metadata key {key!r} is not a string", path=path)
        if isinstance(entry, _record("BytesStorageMetadata")):
            if (key, None) not in where:
                raise CheckpointCorruptError(f"value {key!r} has no storage entry", path=path)
            values[key] = ValueEntry(key, *_storage_info(where[(key, None)], f"value {key!r}", path))
            continue
        if not isinstance(entry, _record("TensorStorageMetadata")):
            raise CheckpointFormatError(f"{key!r} is described by a {type(entry).__name__}", path=path)
        dtype = _dtype_of(_field(entry, "properties"), key, path)
        shape = _ints(_field(entry, "size"), f"size of {key!r}", path)
        chunks = []
        raw_chunks = _field(entry, "chunks")
        if not isinstance(raw_chunks, list | tuple):
            raise CheckpointFormatError(f"{key!r} has no list of chunks", path=path)
        for raw in raw_chunks:
            if not isinstance(raw, _record("ChunkStorageMetadata")):
                raise CheckpointFormatError(f"a chunk of {key!r} is a {type(raw).__name__}", path=path)
            offsets = _ints(_field(raw, "offsets"), f"chunk offsets of {key!r}", path)
            sizes = _ints(_field(raw, "sizes"), f"chunk sizes of {key!r}", path)
            info = where.get((key, offsets))
            if info is None:
                raise CheckpointCorruptError(f"chunk {list(offsets)} of {key!r} has no storage entry", path=path)
            chunks.append(Chunk(offsets, sizes, *_storage_info(info, f"chunk {list(offsets)} of {key!r}", path)))
        _check_tiling(key, shape, chunks, path)
        tensors[key] = TensorEntry(key, dtype, shape, tuple(chunks))
    files = sorted({c.file for t in tensors.values() for c in t.chunks} | {v.file for v in values.values()})
    return Metadata(path, tensors, values, _planner_paths(_field(root, "planner_data"), path), tuple(files))


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, mtime_ns: int, size: int, inode: int) -> Metadata:
    return _checked(_unpickle(Path(path)), Path(path))


def read_metadata(path: str | os.PathLike) -> Metadata:
    """The checked ``.metadata`` of a DCP folder (parsed once per version of the file: every
    rank's load, the layout detection and the readers ask for it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError("DCP .metadata does not exist", path=path) from None
    return _read_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size, st.st_ino)


# ----------------------------------------------------------------------------- the data files
@dataclass(frozen=True)
class RawTensor:
    """Where a chunk's bytes are: element 0 of its storage at byte ``start`` of ``file``, and the
    view into that storage (``header``, checked against the metadata)."""

    file: str
    start: int
    header: TensorHeader


def locate_tensor(fd: int, chunk: Chunk, dtype: torch.dtype, *, key: str, path: str | os.PathLike) -> RawTensor:
    """Where the bytes of ``chunk`` (of tensor ``key``, of the metadata's ``dtype``) are: reads
    the zip's central directory and the small tensor header, never the data."""
    path = os.fspath(path)
    what = f"chunk {list(chunk.offsets)} of {key!r} in {chunk.file}"
    with contextlib.ExitStack() as stack:
        try:
            zf, prefix = stack.enter_context(open_archive(fd, chunk.offset, chunk.length, what, path))
        except CheckpointCorruptError:
            if _is_safetensors(fd):
                raise CheckpointFormatError(
                    "is a safetensors file: written with FileSystemWriter(serialization_format=SAFETENSORS), whose "
                    ".metadata offsets are not byte positions (torch's own FileSystemReader cannot read it either); "
                    "save with the default TORCH_SAVE format",
                    path=path,
                ) from None
            raise
        header = tensor_header(zf, prefix, what, path)
        info = zf.getinfo(f"{prefix}data/{header.storage_key}")
    if header.dtype != dtype:
        raise CheckpointFormatError(f"{what} holds {header.dtype}, the metadata says {dtype}", path=path)
    if header.shape != chunk.sizes:
        raise CheckpointFormatError(
            f"{what} has shape {list(header.shape)}, the metadata says {list(chunk.sizes)}", path=path
        )
    start = record_start(fd, chunk.offset, chunk.length, info, what, path)
    return RawTensor(chunk.file, chunk.offset + start, header)


def _is_safetensors(fd: int) -> bool:
    head = os.pread(fd, 9, 0)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.fstat(fd).st_size


def read_value(fd: int, entry: ValueEntry, *, path: str | os.PathLike) -> Any:
    """A value that is not a tensor, unpickled with :mod:`~ckptio.formats.plain_pickle` (no globals)."""
    what = f"value {entry.key!r}"
    with open_archive(fd, entry.offset, entry.length, what, os.fspath(path)) as (zf, prefix):
        data = small_record(zf, f"{prefix}data.pkl", what, os.fspath(path))
    return plain_pickle.loads(data, path=path, what=f"DCP {what}")
