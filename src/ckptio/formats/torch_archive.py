"""A ``torch.save`` archive inside a byte range of a larger file, read without unpickling a tensor.

DCP (:mod:`ckptio.formats.dcp`) stores every chunk as the bytes of ``torch.save(chunk)``: a zip
archive of ``<prefix>/data.pkl`` (how to rebuild the tensor) and ``<prefix>/data/<key>`` records
(the raw storage bytes, stored, never compressed). Here the zip's central directory is read
through ``pread`` (:class:`_Range`), ``data.pkl`` is parsed into a symbolic call
(:func:`parse_symbolically`: opcodes only, no global imported, nothing called) that must be a
plain ``torch._utils._rebuild_tensor_v2`` / ``_v3`` of one storage (:func:`tensor_header`), and
the byte offset of the storage record is taken from its local zip header
(:func:`record_start`). A reader then copies only the bytes it needs, straight from the file.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickletools
import struct
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ckptio.errors import CheckpointCorruptError, CheckpointFormatError, UnsafeCheckpointError

_MAX_HEADER_BYTES = 1 << 20  # a tensor's data.pkl is ~200 bytes, a param group value's ~100
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature ... name length, extra length


class _Range(io.RawIOBase):
    """``length`` bytes of an open file from ``start``, read with ``pread`` (a file view for zipfile)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = (0, self.pos, self.length)[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        data = os.pread(self.fd, n, self.start + self.pos) if n else b""
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


@contextlib.contextmanager
def open_archive(fd: int, offset: int, length: int, what: str, path: str) -> Iterator[tuple[zipfile.ZipFile, str]]:
    """The ``torch.save`` zip archive in a byte range, and its record prefix (``archive/``)."""
    try:
        zf = zipfile.ZipFile(_Range(fd, offset, length))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointCorruptError(
            f"{what} (bytes {offset}..{offset + length}) is not a readable torch.save archive: {exc}", path=path
        ) from exc
    with zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{what} is not one torch.save archive (no single data.pkl)", path=path)
        prefix = pickles[0].removesuffix("data.pkl")
        if f"{prefix}byteorder" in zf.namelist():
            order = small_record(zf, f"{prefix}byteorder", what, path).decode("ascii", "replace")
            if order != sys.byteorder:
                raise CheckpointFormatError(f"{what} was saved {order}-endian; this machine is not", path=path)
        yield zf, prefix


def small_record(zf: zipfile.ZipFile, name: str, what: str, path: str) -> bytes:
    try:
        info = zf.getinfo(name)
        if info.file_size > _MAX_HEADER_BYTES:
            raise CheckpointFormatError(f"{what}: {name} is {info.file_size} bytes, too large for a header", path=path)
        return zf.read(name)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, NotImplementedError) as exc:
        if isinstance(exc, CheckpointFormatError):
            raise
        raise CheckpointCorruptError(f"{what}: cannot read {name}: {exc}", path=path) from exc


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass(frozen=True)
class _Call:
    func: Any
    args: tuple


@dataclass(frozen=True)
class _Persistent:
    pid: Any


_PUSH_ARG = {"BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINUNICODE8", "BININT", "BININT1", "BININT2", "LONG1"}
_PUSH_ARG |= {"INT", "LONG", "LONG4", "BINFLOAT", "FLOAT"}
_CONSTANTS = {"NEWTRUE": True, "NEWFALSE": False, "NONE": None}
_TUPLE_N = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def parse_symbolically(data: bytes, what: str, path: str) -> Any:
    """What a pickle would build, with every global a :class:`_Global` name and every call a
    :class:`_Call`: nothing is imported or called. Only the opcodes ``torch.save`` uses for a
    tensor are understood; anything else is refused."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                if len(stack) != 1 or marks:
                    break
                return stack[0]
            if name == "GLOBAL":
                module, _, attr = arg.partition(" ")
                stack.append(_Global(module, attr))
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                if not isinstance(module, str) or not isinstance(attr, str):
                    break
                stack.append(_Global(module, attr))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                stack.append(memo[arg])
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "TUPLE":
                start = marks.pop()
                items = tuple(stack[start:])
                del stack[start:]
                stack.append(items)
            elif name in _TUPLE_N:
                n = _TUPLE_N[name]
                items = tuple(stack[len(stack) - n :]) if n else ()
                del stack[len(stack) - n :]
                stack.append(items)
            elif name in _PUSH_ARG:
                stack.append(arg)
            elif name in _CONSTANTS:
                stack.append(_CONSTANTS[name])
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "BINPERSID":
                stack.append(_Persistent(stack.pop()))
            elif name == "REDUCE":
                args, func = stack.pop(), stack.pop()
                stack.append(_Call(func, args))
            else:
                raise CheckpointFormatError(f"{what}: pickle opcode {name} has no place in a tensor header", path=path)
    except (ValueError, IndexError, KeyError) as exc:
        raise CheckpointFormatError(f"{what}: malformed tensor header pickle ({exc})", path=path) from exc
    raise CheckpointFormatError(f"{what}: malformed tensor header pickle", path=path)


def _globals_in(value: Any) -> Iterator[_Global]:
    if isinstance(value, _Global):
        yield value
    elif isinstance(value, _Call):
        yield from _globals_in(value.func)
        yield from _globals_in(value.args)
    elif isinstance(value, _Persistent):
        yield from _globals_in(value.pid)
    elif isinstance(value, tuple):
        for v in value:
            yield from _globals_in(v)


# torch.save's typed storage names (``torch.storage._dtype_to_storage_type_map``, stable for years);
# dtypes without one (float8, uint16, ...) are saved as an UntypedStorage plus the dtype (_v3)
_LEGACY_STORAGES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "BFloat16Storage": torch.bfloat16,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
}
_V2 = _Global("torch._utils", "_rebuild_tensor_v2")
_V3 = _Global("torch._utils", "_rebuild_tensor_v3")
_UNTYPED = _Global("torch.storage", "UntypedStorage")
_HOOKS = _Call(_Global("collections", "OrderedDict"), ())


def _torch_dtype(g: Any) -> torch.dtype | None:
    if isinstance(g, _Global) and g.module == "torch":
        value = vars(torch).get(g.name)  # never torch.__getattr__, which imports submodules by name
        if isinstance(value, torch.dtype):
            return value
    return None


def _allowed_global(g: _Global) -> bool:
    if g in (_V2, _V3, _UNTYPED, _HOOKS.func):
        return True
    return g.module == "torch" and (g.name in _LEGACY_STORAGES or _torch_dtype(g) is not None)


@dataclass(frozen=True)
class TensorHeader:
    """What ``data.pkl`` says of the tensor: its storage record, dtype and element count, and the
    view into it (storage offset, shape, stride in elements)."""

    storage_key: str
    dtype: torch.dtype
    storage_numel: int
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def contiguous(self) -> bool:
        acc, ok = 1, True
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            ok = ok and (size == 1 or stride == acc)
            acc *= size
        return ok or math.prod(self.shape) <= 1


def _header_of(call: Any, what: str, path: str) -> TensorHeader:
    """The :class:`TensorHeader` of a ``_rebuild_tensor_v2`` / ``_v3`` call, or a refusal naming what it is instead."""
    odd = sorted({f"{g.module}.{g.name}" for g in _globals_in(call) if not _allowed_global(g)})
    if odd:
        raise UnsafeCheckpointError(
            f"{what}: its pickle references {', '.join(odd)}; a DCP chunk must be a plain tensor", path=path
        )
    v3 = isinstance(call, _Call) and call.func == _V3
    if not isinstance(call, _Call) or call.func not in (_V2, _V3) or not isinstance(call.args, tuple):
        raise CheckpointFormatError(f"{what} is not a plain tensor", path=path)
    args = call.args
    fixed = 7 if v3 else 6
    if len(args) not in (fixed, fixed + 1) or (len(args) == fixed + 1 and args[-1] != {}) or args[5] != _HOOKS:
        raise CheckpointFormatError(f"{what} is not a plain tensor (tensor metadata or hooks attached)", path=path)
    storage, offset, shape, stride = args[:4]
    pid = storage.pid if isinstance(storage, _Persistent) else None
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[2], str)):
        raise CheckpointFormatError(f"{what} does not name one storage", path=path)
    _, kind, key, _, numel = pid
    if v3:
        dtype = _torch_dtype(args[6])
        ok = kind == _UNTYPED and dtype is not None and type(numel) is int and numel % dtype.itemsize == 0
        numel = numel // dtype.itemsize if ok else numel
    else:
        dtype = _LEGACY_STORAGES.get(kind.name) if isinstance(kind, _Global) and kind.module == "torch" else None
        ok = dtype is not None and type(numel) is int
    if not ok or type(offset) is not int or offset < 0 or numel < 0:
        raise CheckpointFormatError(f"{what} has a storage of unknown type or size", path=path)
    if not isinstance(shape, tuple) or not isinstance(stride, tuple) or len(shape) != len(stride):
        raise CheckpointFormatError(f"{what} has no shape and stride", path=path)
    if not all(type(v) is int and v >= 0 for v in (*shape, *stride)):
        raise CheckpointFormatError(f"{what} has a bad shape {shape} or stride {stride}", path=path)
    if math.prod(shape) and offset + sum((s - 1) * st for s, st in zip(shape, stride)) >= numel:
        raise CheckpointFormatError(f"{what} reaches past its storage of {numel} elements", path=path)
    return TensorHeader(key, dtype, numel, offset, shape, stride)


def tensor_header(zf: zipfile.ZipFile, prefix: str, what: str, path: str) -> TensorHeader:
    """The header of the tensor an archive holds, checked against its storage record (present,
    stored uncompressed, exactly as large as the storage)."""
    header = _header_of(parse_symbolically(small_record(zf, f"{prefix}data.pkl", what, path), what, path), what, path)
    try:
        info = zf.getinfo(f"{prefix}data/{header.storage_key}")
    except KeyError:
        raise CheckpointCorruptError(f"{what}: no storage record data/{header.storage_key}", path=path) from None
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != header.storage_numel * header.dtype.itemsize:
        raise CheckpointFormatError(f"{what}: its storage record is compressed or of the wrong size", path=path)
    return header


def record_start(fd: int, base: int, length: int, info: zipfile.ZipInfo, what: str, path: str) -> int:
    """Where the bytes of record ``info`` start, relative to the archive at ``base`` (``length`` bytes)."""
    head = os.pread(fd, _LOCAL_HEADER.size, base + info.header_offset)
    if len(head) != _LOCAL_HEADER.size:
        raise CheckpointCorruptError(f"{what}: the file ends inside it", path=path)
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(head)
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if signature != b"PK\x03\x04" or start + info.file_size > length:
        raise CheckpointCorruptError(f"{what}: bad zip record header", path=path)
    return start
