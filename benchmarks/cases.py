"""What each tool does in the benchmark: one save function and one load function per tool.

Every save ends durable (the tool's call, then an fsync of each file it wrote and of its
folder where the tool does not do that itself), so all tools pay for the disk. Every load
lands the weights in the live model that already exists (``load_state_dict`` after the
tool's own load), except ``transformers``, whose ``from_pretrained`` builds a new model: that
is how its users load, and it is reported as such.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK = 64 * 1024 * 1024


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (or ``path`` itself), then the folders."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    folder = path if path.is_dir() else path.parent
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def tensor_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


@dataclass
class Context:
    """What every case needs: the live model, its state dict (tied weights once), the paths."""

    model: torch.nn.Module
    state: dict[str, torch.Tensor]
    root: Path
    shard_mib: int
    read_buffer: torch.Tensor  # for the raw read: existing memory, like a live model

    def path(self, tool: str) -> Path:
        return self.root / tool


@dataclass(frozen=True)
class Tool:
    name: str
    label: str
    save: Callable[[Context, Path], None]
    load: Callable[[Context, Path], object] | None
    load_note: str = "into the live model"


# ----------------------------------------------------------------------------- raw disk


def raw_save(ctx: Context, path: Path) -> None:
    """The disk's own speed for these bytes: one file, large writes, one fsync (like dd conv=fsync)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in ctx.state.values():
            view = tensor_view(t)
            done = 0
            while done < len(view):
                done += os.write(fd, view[done : done + CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_files_save(ctx: Context, path: Path) -> None:
    """The same bytes in shard-sized files (the layout ckptio writes), one after another, each fsync'd."""
    path.mkdir()
    limit = ctx.shard_mib * 1024 * 1024
    groups: list[list[torch.Tensor]] = [[]]
    size = 0
    for t in ctx.state.values():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    for i, group in enumerate(groups):
        fd = os.open(path / f"part-{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for t in group:
                view = tensor_view(t)
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done : done + CHUNK])
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_tree(path)


def raw_load(ctx: Context, path: Path) -> None:
    """Sequential read of the same bytes into memory that already exists (like dd to a buffer)."""
    view = tensor_view(ctx.read_buffer)
    with open(path, "rb", buffering=0) as fh:
        done = 0
        while True:
            n = fh.readinto(view[done : done + CHUNK])
            if not n:
                break
            done += n


# ----------------------------------------------------------------------------- ckptio


def _booster():
    from ckptio import Booster

    return Booster()


def ours_save(ctx: Context, path: Path) -> None:
    _booster().save_model(ctx.model, path, shard=True, use_safetensors=True, size_per_shard=ctx.shard_mib)


def ours_load(ctx: Context, path: Path, num_threads: int = 1) -> None:
    _booster().load_model(ctx.model, path, num_threads=num_threads)


# ----------------------------------------------------------------------------- the others


def torch_save(ctx: Context, path: Path) -> None:
    torch.save(ctx.state, path)
    fsync_tree(path)


def torch_load(ctx: Context, path: Path, mmap: bool = False) -> None:
    state = torch.load(path, weights_only=True, mmap=mmap)
    ctx.model.load_state_dict(state, strict=False)
    del state


def safetensors_save(ctx: Context, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(ctx.state, path, metadata={"format": "pt"})
    fsync_tree(path)


def safetensors_load(ctx: Context, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(path)
    ctx.model.load_state_dict(state, strict=False)
    del state


def hf_save(ctx: Context, path: Path) -> None:
    ctx.model.save_pretrained(path, safe_serialization=True, max_shard_size=ctx.shard_mib * 1024 * 1024)
    fsync_tree(path)


def hf_load(ctx: Context, path: Path) -> None:
    model = type(ctx.model).from_pretrained(path)
    del model


def dcp_save(ctx: Context, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(ctx.state, checkpoint_id=str(path))  # FileSystemWriter fsyncs its files itself


def dcp_load(ctx: Context, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.load(dict(ctx.state), checkpoint_id=str(path))  # in place: ctx.state shares the live tensors


TOOLS: list[Tool] = [
    Tool("raw", "raw write / read (disk speed)", raw_save, raw_load, "into existing memory"),
    Tool("raw_files", "raw write, shard-sized files", raw_files_save, None),
    Tool("ckptio", "ckptio sharded safetensors", ours_save, ours_load),
    Tool(
        "ckptio_t2",
        "ckptio, load num_threads=2",
        ours_save,
        lambda ctx, path: ours_load(ctx, path, num_threads=2),
    ),
    Tool("torch", "torch.save / torch.load", torch_save, torch_load),
    Tool("torch_mmap", "torch.load(mmap=True)", torch_save, lambda ctx, path: torch_load(ctx, path, mmap=True)),
    Tool("safetensors", "safetensors save_file / load_file", safetensors_save, safetensors_load),
    Tool("transformers", "transformers save/from_pretrained", hf_save, hf_load, "builds a new model"),
    Tool("dcp", "torch.distributed.checkpoint", dcp_save, dcp_load),
]

# Tools that need a transformers PreTrainedModel (skipped for `--many-small`).
NEEDS_PRETRAINED = {"transformers"}

# Tools that share another tool's saved files (timed once, loaded from that tool's path).
SAVED_BY = {"ckptio_t2": "ckptio", "torch_mmap": "torch"}
