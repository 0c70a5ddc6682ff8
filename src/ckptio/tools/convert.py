"""Rewriting a model checkpoint in another layout, through the same engine and commit as a save.

The source's tensors enter the engine as :class:`~ckptio.engine.tensors.Deferred` tensors:
each is read only when the destination file that holds it is written, and a source file is
closed once all its tensors are written. A safetensors destination (a folder of shards or one
file) streams each tensor in row-major pieces of at most :data:`PIECE_BYTES` read by offset
from a safetensors or DCP source (``read_box``), so memory stays bounded whatever the tensor
sizes: measured in ``benchmarks/convert_memory.py``. Other sources (``torch.save`` files, read
through a memory map) hand over whole tensors; a ``.bin`` destination (``torch.save`` needs the
whole dict) holds everything.

``key_map`` renames keys on the way (a dict or function, as for loads); the command line's
``--key-map`` expressions are sed-like (:func:`key_map_from_expressions`).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ckptio.engine.group import Group
from ckptio.engine.load import saved_extra_state
from ckptio.engine.save import TensorPart, save_parts
from ckptio.engine.tensors import Deferred, Region
from ckptio.errors import CheckpointError, CheckpointFormatError
from ckptio.formats import extra_state as extra_state_format
from ckptio.formats import naming
from ckptio.layouts.detect import detect
from ckptio.layouts.model import MiB, ModelSaveOptions, model_metadata, model_owned_files
from ckptio.progress import Progress
from ckptio.state.report import KeyMap, key_mapper
from ckptio.storage.location import exists, is_url, normalize, readable, url_basename
from ckptio.tools.view import ModelView

FORMATS = ("safetensors", "bin")
#: largest piece of a tensor read at once when streaming it into a safetensors file (two may be
#: alive per writer thread: the one being written and the next)
PIECE_BYTES = 16 * 1024 * 1024


def is_single_file(dst: str | os.PathLike) -> bool:
    return os.fspath(dst).lower().endswith(naming.SINGLE_FILE_SUFFIXES)


def row_major_pieces(shape: Sequence[int], itemsize: int, limit: int) -> Iterator[Region]:
    """Boxes that tile ``shape`` in row-major order, each of at most ``limit`` bytes (or one
    element): their bytes one after the other are the tensor's."""
    shape = tuple(shape)
    if math.prod(shape) == 0 or not shape:
        if not shape:
            yield Region((), ())
        return
    # k: the outermost dimension along which whole sub-blocks fit the limit
    k = next(d for d in range(len(shape)) if math.prod(shape[d + 1 :]) * itemsize <= limit or d == len(shape) - 1)
    step = max(1, limit // (math.prod(shape[k + 1 :]) * itemsize))
    for outer in itertools.product(*(range(n) for n in shape[:k])):
        for start in range(0, shape[k], step):
            size = min(step, shape[k] - start)
            yield Region((*outer, start) + (0,) * (len(shape) - k - 1), (1,) * k + (size, *shape[k + 1 :]))


class _Source:
    """Deferred reads from a source view; closes each source file after its last tensor."""

    def __init__(self, view: ModelView, bar: Progress) -> None:
        self.view, self.bar = view, bar
        self.remaining = Counter(e.file for e in view.tensors.values())
        self.lock = threading.Lock()

    def deferred(self, key: str) -> Deferred:
        entry = self.view.tensors[key]
        pieces = (lambda: self.pieces(key)) if self.view.reads_boxes(key) else None
        return Deferred(torch.Size(entry.shape), entry.dtype, lambda: self.load(key), pieces)

    def load(self, key: str) -> torch.Tensor:
        tensor = self.view.read(key)
        self.bar.advance(tensor.numel() * tensor.element_size())
        self.done(key)
        return tensor

    def pieces(self, key: str) -> Iterator[torch.Tensor]:
        entry = self.view.tensors[key]
        for region in row_major_pieces(entry.shape, entry.dtype.itemsize, PIECE_BYTES):
            piece = torch.empty(region.shape, dtype=entry.dtype)
            self.view.read_box(key, region, piece)
            self.bar.advance(piece.numel() * piece.element_size())
            yield piece
        self.done(key)

    def done(self, key: str) -> None:
        """``key`` is read (or left out): its file is closed after its last tensor."""
        name = self.view.tensors[key].file
        with self.lock:
            self.remaining[name] -= 1
            last = self.remaining[name] == 0
        if last:
            self.view.release(name)
            self.bar.file_done()


_SUBSTITUTE = re.compile(r"^s(?P<d>[^\w\s\\])")
_DELETE = re.compile(r"^(?P<d>[^\w\s\\])")


def _split(body: str, delimiter: str) -> list[str]:
    """``body`` cut at each ``delimiter`` not escaped with a backslash (``\\/`` is a literal ``/``)."""
    parts, current, i = [], [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body) and body[i + 1] == delimiter:
            current.append(delimiter)
            i += 2
            continue
        if body[i] == delimiter:
            parts.append("".join(current))
            current = []
        else:
            current.append(body[i])
        i += 1
    parts.append("".join(current))
    return parts


def _parse_key_expression(expr: str) -> Callable[[str], str | None]:
    usage = "expected s/REGEX/REPLACEMENT/ (rename; flag g: every match) or /REGEX/d (leave out)"
    try:
        if m := _SUBSTITUTE.match(expr):
            parts = _split(expr[2:], m["d"])
            if len(parts) != 3 or parts[2] not in ("", "g"):
                raise ValueError(usage)
            pattern, replacement, count = re.compile(parts[0]), parts[1], 0 if parts[2] == "g" else 1
            pattern.sub(replacement, "")  # a bad group reference fails now, not on the first key
            return lambda key: pattern.sub(replacement, key, count=count)
        if m := _DELETE.match(expr):
            parts = _split(expr[1:], m["d"])
            if len(parts) != 2 or parts[1] != "d":
                raise ValueError(usage)
            pattern = re.compile(parts[0])
            return lambda key: None if pattern.search(key) else key
    except re.error as exc:
        raise ValueError(f"--key-map {expr!r}: bad regular expression: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"--key-map {expr!r}: {exc}") from None
    raise ValueError(f"--key-map {expr!r}: {usage}")


def key_map_from_expressions(expressions: Sequence[str]) -> Callable[[str], str | None]:
    """A key map from sed-like expressions, applied in order, in Python's ``re`` syntax:
    ``s/^model\\.//`` strips a prefix, ``s/\\.wq\\./.q_proj./`` renames the first match (flag
    ``g``: every match; ``\\1`` in the replacement is a group; any punctuation may replace ``/``),
    ``/freqs_cis$/d`` leaves the keys it matches out. A bad expression raises ``ValueError``
    naming it."""
    steps = [_parse_key_expression(e) for e in expressions]

    def mapped(key: str) -> str | None:
        for step in steps:
            key = step(key)
            if key is None:
                return None
        return key

    return mapped


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    size_per_shard: float = 1024,
    fmt: str = "safetensors",
    overwrite: bool = False,
    quiet: bool = True,
    key_map: KeyMap | None = None,
) -> dict[str, Any]:
    """Rewrite the model checkpoint ``src`` as ``dst`` in Hugging Face layout; returns
    ``{"tensors": n, "bytes": total}`` (of what was written).

    ``src`` may be any model checkpoint ckptio loads, a DCP folder (``dcp.save``, a torchtitan
    ``step-N``) included. ``key_map`` renames its keys (a dict, or a function returning the new
    key or None to leave the tensor out; see :func:`key_map_from_expressions`); two keys renamed
    to one raise before anything is written.

    ``dst`` ending in ``.safetensors``/``.bin`` is one file (a sharded source is consolidated);
    anything else a folder of shards of at most ``size_per_shard`` MiB with an index
    (``fmt``: ``"safetensors"`` or ``"bin"``), ``config.json`` and ``generation_config.json``
    copied along. A training checkpoint's model part is converted; an optimizer is refused.
    The write commits atomically like every save; ``dst`` may be a URL.

    Args:
        src: a model checkpoint in any layout we read, local or an fsspec URL.
        dst: the file or folder to write.
        size_per_shard: the largest shard of a folder ``dst``, in MiB.
        fmt: ``"safetensors"`` or ``"bin"`` for a folder ``dst``.
        overwrite: replace an existing ``dst`` (atomically); else it is refused.
        quiet: no progress bar.
        key_map: renames keys on the way (a dict, or a function returning the new key or None to
            leave the tensor out).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    src_path, dst_path = normalize(src), normalize(dst)
    if not overwrite and exists(dst_path):
        raise CheckpointError("already exists; pass overwrite=True (--overwrite) to replace it", path=dst_path)
    if not is_url(src_path) and not is_url(dst_path) and os.path.abspath(src_path) == os.path.abspath(dst_path):
        raise CheckpointError("SRC and DST are the same path", path=dst_path)
    with readable(src_path, quiet=quiet) as local:
        kind = detect(local).kind
        if kind in ("optimizer", "lr_scheduler", "runs"):
            raise CheckpointFormatError(
                f"holds {'training checkpoints' if kind == 'runs' else 'an ' + kind.replace('_', ' ')}, "
                "not model weights; convert rewrites model checkpoints",
                path=src_path,
            )
        with ModelView(local) as view:
            names = _renamed(view, key_mapper(key_map), src_path)
            total = sum(view.tensors[key].nbytes for key in names)
            label = url_basename(dst_path) if is_url(dst_path) else os.path.basename(dst_path.rstrip("/"))
            with Progress(f"convert -> {label}", total, len(view.files), quiet=quiet) as bar:
                _write(view, _Source(view, bar), names, key_mapper(key_map), dst_path, size_per_shard, fmt)
    return {"tensors": len(names), "bytes": total}


def _renamed(view: ModelView, to_name: Callable[[str], str | None], src: str) -> dict[str, str]:
    """``{source key: destination key}`` in file order, without the keys ``to_name`` leaves out."""
    names: dict[str, str] = {}
    taken: dict[str, str] = {}
    for key in view.keys_in_file_order():
        name = to_name(key)
        if name is None:
            continue
        if name in taken:
            raise CheckpointError(f"key_map renames both {taken[name]!r} and {key!r} to {name!r}", path=src)
        names[key] = taken[name] = name
    return names


def _extra_files(view: ModelView, src: str) -> dict[str, bytes]:
    """``config.json`` and ``generation_config.json`` of a source folder, copied along."""
    folder = view.located.folder
    if not (view.located.is_sharded or os.path.isdir(src)):
        return {}
    names = (naming.HF_CONFIG, naming.HF_GENERATION_CONFIG)
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


def _write(view: ModelView, source: _Source, names: dict[str, str], to_name, dst: str, size_per_shard, fmt) -> None:
    state = {name: source.deferred(key) for key, name in names.items()}
    for key in view.tensors.keys() - names.keys():
        source.done(key)  # left out: never read
    group = Group.of_one()
    saved = {}  # modules' extra state that is not a tensor: carried along, renamed like the tensors
    for key, value in saved_extra_state(view.located).items():
        if (name := to_name(key)) is not None:
            saved[name] = value
    extra_state = extra_state_format.encode(saved, path=view.path) if saved else None
    if is_single_file(dst):
        opts = ModelSaveOptions(shard=False, use_safetensors=dst.lower().endswith(".safetensors"))
        part = TensorPart(state, opts.write_spec(dst, extra_state), group)
        save_parts(dst, [part], group, folder=False)
        return
    opts = ModelSaveOptions(shard=True, max_shard_bytes=max(1, int(size_per_shard * MiB)),
                            use_safetensors=fmt == "safetensors")  # fmt: skip
    extra = _extra_files(view, view.path)
    part = TensorPart(state, opts.write_spec(), group, metadata=model_metadata(opts, extra, extra_state))
    save_parts(dst, [part], group, folder=True, owns=model_owned_files(None, extra))
