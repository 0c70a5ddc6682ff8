"""Rewriting a model checkpoint in another layout, through the same engine and commit as a save.

The source's tensors enter the engine as :class:`~ckptio.engine.tensors.Deferred` tensors:
each is read only when the destination file that holds it is written, and a source file is
closed once all its tensors are written. So a sharded destination holds at most one shard
per writer thread in memory, a single ``.safetensors`` destination streams tensor by tensor,
and only a single ``.bin`` destination (``torch.save`` needs the whole dict) holds everything.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import Any

import torch

from ckptio.engine.group import Group
from ckptio.engine.save import TensorPart, save_parts
from ckptio.engine.tensors import Deferred
from ckptio.errors import CheckpointError, CheckpointFormatError
from ckptio.formats import naming
from ckptio.layouts.detect import detect
from ckptio.layouts.model import MiB, ModelSaveOptions, model_metadata, model_owned_files
from ckptio.progress import Progress
from ckptio.storage.location import exists, is_url, normalize, readable, url_basename
from ckptio.tools.view import ModelView

FORMATS = ("safetensors", "bin")


def is_single_file(dst: str | os.PathLike) -> bool:
    return os.fspath(dst).lower().endswith(naming.SINGLE_FILE_SUFFIXES)


class _Source:
    """Deferred reads from a source view; closes each source file after its last tensor."""

    def __init__(self, view: ModelView, bar: Progress) -> None:
        self.view, self.bar = view, bar
        self.remaining = Counter(e.file for e in view.tensors.values())
        self.lock = threading.Lock()

    def deferred(self, key: str) -> Deferred:
        entry = self.view.tensors[key]
        return Deferred(torch.Size(entry.shape), entry.dtype, lambda: self.load(key))

    def load(self, key: str) -> torch.Tensor:
        tensor = self.view.read(key)
        name = self.view.tensors[key].file
        self.bar.advance(tensor.numel() * tensor.element_size())
        with self.lock:
            self.remaining[name] -= 1
            done = self.remaining[name] == 0
        if done:
            self.view.release(name)
            self.bar.file_done()
        return tensor


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    size_per_shard: float = 1024,
    fmt: str = "safetensors",
    overwrite: bool = False,
    quiet: bool = True,
) -> dict[str, Any]:
    """Rewrite the model checkpoint ``src`` as ``dst`` in Hugging Face layout; returns
    ``{"tensors": n, "bytes": total}``.

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
            total = sum(e.nbytes for e in view.tensors.values())
            label = url_basename(dst_path) if is_url(dst_path) else os.path.basename(dst_path.rstrip("/"))
            with Progress(f"convert -> {label}", total, len(view.files), quiet=quiet) as bar:
                _write(view, _Source(view, bar), dst_path, size_per_shard, fmt)
    return {"tensors": len(view.tensors), "bytes": total}


def _extra_files(view: ModelView, src: str) -> dict[str, bytes]:
    """``config.json`` and ``generation_config.json`` of a source folder, copied along."""
    folder = view.located.folder
    if not (view.located.is_sharded or os.path.isdir(src)):
        return {}
    names = (naming.HF_CONFIG, naming.HF_GENERATION_CONFIG)
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


def _write(view: ModelView, source: _Source, dst: str, size_per_shard: float, fmt: str) -> None:
    state = {key: source.deferred(key) for key in view.keys_in_file_order()}
    group = Group.of_one()
    if is_single_file(dst):
        opts = ModelSaveOptions(shard=False, use_safetensors=dst.lower().endswith(".safetensors"))
        part = TensorPart(state, opts.write_spec(dst), group)
        save_parts(dst, [part], group, folder=False)
        return
    opts = ModelSaveOptions(shard=True, max_shard_bytes=max(1, int(size_per_shard * MiB)),
                            use_safetensors=fmt == "safetensors")  # fmt: skip
    extra = _extra_files(view, view.path)
    part = TensorPart(state, opts.write_spec(), group, metadata=model_metadata(opts, extra))
    save_parts(dst, [part], group, folder=True, owns=model_owned_files(None, extra))
