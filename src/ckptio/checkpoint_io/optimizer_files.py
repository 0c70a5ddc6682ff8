"""Optimizer state to files and back, in three layouts.

* ``shard=False``: one ``torch.save`` file in the plain ``optimizer.state_dict()`` layout
  (positional ids), as ColossalAI and plain PyTorch write it.
* ``shard=True``, layout ``"ckptio"`` (the default): state tensors by parameter name in
  size-bounded safetensors shards (``optimizer-00001-of-00002.safetensors``, key
  ``<param_name>/<state_name>``, tensors nested in a state entry ``<param_name>/<state_name>/<index>``,
  see docs/formats.md) and ``optimizer.index.json``: the usual ``metadata`` +
  ``weight_map``, plus ``optimizer``: groups with hyper-parameters and parameter names,
  full parameter shapes, scalar state such as ``step`` with its dtype
  (:mod:`ckptio.checkpoint_io.optimizer_state`). No pickle anywhere.
* ``shard=True``, layout ``"colossalai"``: ColossalAI's layout (:mod:`ckptio.formats.colossal_optim`).

Loading finds the layout itself; names are used when both the file and the live optimizer
have them, positions otherwise.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ckptio.checkpoint_io import optimizer_state as ostate
from ckptio.checkpoint_io.model_files import ModelFilePlan, ModelSaveOptions, write_model_files
from ckptio.checkpoint_io.model_state import to_cpu_contiguous
from ckptio.errors import CheckpointCorruptError, CheckpointFormatError, CheckpointNotFoundError
from ckptio.formats import colossal_optim, naming, safetensors_format, torch_format
from ckptio.formats.hf_index import read_index, read_json_file
from ckptio.planning.split import split_greedy
from ckptio.storage import atomic
from ckptio.storage.base import FileRecord, FileWriter
from ckptio.storage.verify import check_against_manifest

WEIGHTS_NAME = "optimizer.safetensors"
INDEX_NAME = "optimizer.index.json"
LAYOUTS = ("ckptio", "colossalai")


@dataclass(frozen=True)
class OptimizerSaveOptions:
    shard: bool = False
    prefix: str | None = None
    max_shard_bytes: int = 1024 * 1024 * 1024
    layout: str = "ckptio"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"optimizer layout must be one of {LAYOUTS}, got {self.layout!r}")


def weights_name(prefix: str | None) -> str:
    return naming.add_prefix(WEIGHTS_NAME, prefix)


def index_name(prefix: str | None) -> str:
    return naming.add_prefix(INDEX_NAME, prefix)


def owned_files(prefix: str | None):
    """Every optimizer file a sharded save with this prefix replaces, in either layout."""
    p = re.escape(f".{prefix}") if prefix else ""
    ours = re.compile(rf"^(?:optimizer{p}(?:-\d{{5}}-of-\d{{5}})?\.safetensors|optimizer\.index{p}\.json)$")
    theirs = colossal_optim.owned_files(prefix)
    return lambda name: bool(ours.match(name)) or theirs(name)


def _is_our_index(name: str) -> bool:
    return name.startswith("optimizer.index") and name.endswith(".json")


@dataclass
class OptimizerSnapshot:
    """What a save needs from a live optimizer: its ``state_dict()`` (tensors on any device,
    or staged host copies for an async save), parameter names and full shapes by id."""

    state_dict: dict[str, Any]
    names: list[str] | None
    shapes: list[tuple[int, ...]]


def snapshot(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> OptimizerSnapshot:
    shapes = [tuple(p.shape) for group in ostate.optimizer_params(optimizer) for p in group]
    return OptimizerSnapshot(optimizer.state_dict(), ostate.param_names(optimizer, model), shapes)


def cpu_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """An optimizer ``state_dict`` with every state tensor (nested ones too) on the CPU and contiguous."""
    state = {
        pid: {k: ostate.map_tensors(v, to_cpu_contiguous) for k, v in entries.items()}
        for pid, entries in state_dict["state"].items()
    }
    return {"state": state, "param_groups": state_dict["param_groups"]}


# ------------------------------------------------------------------------------- saving
def write_optimizer_files(
    writer: FileWriter,
    snap: OptimizerSnapshot,
    opts: OptimizerSaveOptions,
    *,
    subdir: str = "",
) -> list[FileRecord]:
    """Write a sharded optimizer save (either layout) into ``writer`` under ``subdir``."""
    if opts.layout == "colossalai":
        return colossal_optim.write(
            writer,
            cpu_state_dict(snap.state_dict),
            prefix=opts.prefix,
            max_shard_bytes=opts.max_shard_bytes,
            subdir=subdir,
        )
    flat, description = ostate.flatten_optimizer_state(snap.state_dict, snap.names, snap.shapes)
    flat = {k: to_cpu_contiguous(v) for k, v in flat.items()}
    return write_flat_optimizer(writer, flat, description, opts, subdir=subdir)


def plan_optimizer_files(sizes: list[tuple[str, int]], opts: OptimizerSaveOptions) -> ModelFilePlan:
    """Shards for the flat state tensors (same splitter and naming rule as model shards)."""
    total = sum(n for _, n in sizes)
    if not sizes:
        return ModelFilePlan((), {}, 0)
    plan = split_greedy(sizes, opts.max_shard_bytes)
    files = tuple(
        (naming.shard_name(weights_name(opts.prefix), i, len(plan)), keys) for i, keys in enumerate(plan.shards)
    )
    return ModelFilePlan(files, {k: name for name, keys in files for k in keys}, total)


def optimizer_index_bytes(plan: ModelFilePlan, description: dict[str, Any]) -> bytes:
    """The index: Hugging Face's ``metadata`` + ``weight_map``, and the optimizer description."""
    body = {
        "metadata": {
            "total_size": plan.total_size,
            "format": ostate.FORMAT,
            "format_version": description.get("format_version", ostate.FORMAT_VERSION),
        },
        "weight_map": plan.weight_map or {},
        "optimizer": description,
    }
    return (json.dumps(body, indent=1) + "\n").encode("utf-8")


def write_flat_optimizer(
    writer: FileWriter,
    flat: dict[str, torch.Tensor],
    description: dict[str, Any],
    opts: OptimizerSaveOptions,
    *,
    subdir: str = "",
    plan: ModelFilePlan | None = None,
    which_files=lambda i: True,
    write_index: bool = True,
) -> list[FileRecord]:
    """Write the flat tensors (CPU, contiguous) as safetensors shards and, if asked, the index.

    A multi-rank save may call this on every rank with the same ``plan`` and its own
    ``which_files``, and ``write_index`` on one rank only.
    """
    plan = plan or plan_optimizer_files([(k, t.numel() * t.element_size()) for k, t in flat.items()], opts)
    records = write_model_files(
        writer,
        flat,
        ModelSaveOptions(shard=True, use_safetensors=True),
        subdir=subdir,
        plan=plan,
        which_files=which_files,
    )
    if write_index:
        base = f"{subdir}/" if subdir else ""
        records.append(writer.write(base + index_name(opts.prefix), [optimizer_index_bytes(plan, description)]))
    return records


def save_optimizer_state(snap: OptimizerSnapshot, checkpoint: str | os.PathLike, opts: OptimizerSaveOptions) -> Path:
    """Save to ``checkpoint`` (a file for ``shard=False``, a folder otherwise), atomically."""
    if not opts.shard:
        commit = atomic.FileCommit(checkpoint).begin()
        with atomic.aborting_on_error(commit):
            with commit.writer.open_stream(commit.staging_name) as stream:
                torch_format.save(cpu_state_dict(snap.state_dict), stream)
            return commit.commit(stream.record)
    commit = atomic.FolderCommit(checkpoint, owns=owned_files(opts.prefix)).begin()
    with atomic.aborting_on_error(commit):
        return commit.commit(write_optimizer_files(commit.writer, snap, opts))


# ------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class LocatedOptimizer:
    layout: str  # "ckptio", "colossalai" or "torch"
    path: Path  # the index file, or the single file


def locate_optimizer(checkpoint: str | os.PathLike) -> LocatedOptimizer:
    """Which layout ``checkpoint`` holds: an index file, a single file, or a folder with one index."""
    path = Path(checkpoint)
    if not path.exists():
        atomic.recover(path)
    if path.is_file():
        if _is_our_index(path.name):
            return LocatedOptimizer("ckptio", path)
        if colossal_optim.is_index_name(path.name):
            return LocatedOptimizer("colossalai", path)
        return LocatedOptimizer("torch", path)
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir() if not naming.is_temporary(p.name))
        found = [("ckptio", n) for n in entries if _is_our_index(n)]
        found += [("colossalai", n) for n in entries if colossal_optim.is_index_name(n)]
        if len(found) == 1:
            return LocatedOptimizer(found[0][0], path / found[0][1])
        if not found:
            raise CheckpointNotFoundError(
                f"no optimizer checkpoint in this folder: expected {INDEX_NAME} or {colossal_optim.INDEX_NAME}",
                path=path,
            )
        raise CheckpointFormatError(
            f"folder holds several optimizer indexes ({', '.join(n for _, n in found)}); pass the index file to load",
            path=path,
        )
    raise CheckpointNotFoundError("optimizer checkpoint does not exist", path=path)


class _ShardReader:
    """Reads state tensors of our layout by key, each shard opened once, checked against the ref."""

    def __init__(self, folder: Path, weight_map: dict[str, str]) -> None:
        self.folder = folder
        self.weight_map = weight_map
        self._open: dict[str, safetensors_format.SafetensorsReader] = {}

    def __call__(self, ref: ostate.TensorRef, param: torch.Tensor) -> torch.Tensor:
        name = self.weight_map.get(ref.key)
        if name is None:
            raise CheckpointCorruptError(f"index has no file for state tensor {ref.key!r}", path=self.folder)
        reader = self._open.get(name)
        if reader is None:
            reader = self._open[name] = safetensors_format.SafetensorsReader.open(self.folder / name)
        info = reader.tensors.get(ref.key)
        if info is None or info.dtype != ref.dtype or tuple(info.shape) != ref.shape:
            raise CheckpointCorruptError(
                f"state tensor {ref.key!r} is missing or differs from the index ({ref.dtype}{list(ref.shape)})",
                path=self.folder / name,
            )
        return reader.read(ref.key)

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()


def read_saved_optimizer(located: LocatedOptimizer, *, verify: bool = False):
    """The saved optimizer and a reader for its tensors (``None`` when all are in memory)."""
    path = located.path
    if located.layout == "torch":
        check_against_manifest(path.parent, [path.name], checksums=verify)
        return ostate.saved_from_state_dict(torch_format.load(path), path=str(path)), None
    if located.layout == "colossalai":
        index = read_index(path)
        group_file = index.metadata.get("param_groups")
        names = [path.name, *index.shard_files] + ([group_file] if isinstance(group_file, str) else [])
        check_against_manifest(path.parent, names, checksums=verify)
        state_dict, _ = colossal_optim.read(path)
        return ostate.saved_from_state_dict(state_dict, path=str(path)), None
    index = read_index(path)
    check_against_manifest(path.parent, [path.name, *index.shard_files], checksums=verify)
    raw = read_json_file(path, what="optimizer index")
    saved = ostate.saved_from_description(raw.get("optimizer"), path=str(path))
    return saved, _ShardReader(path.parent, index.weight_map)


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    checkpoint: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    verify: bool = False,
) -> None:
    """Load any supported layout into ``optimizer``; checks everything before changing it."""
    state_dict = prepare_optimizer_state(optimizer, checkpoint, model=model, verify=verify)
    apply_optimizer_state(optimizer, state_dict, checkpoint)


def prepare_optimizer_state(
    optimizer: torch.optim.Optimizer,
    checkpoint: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Read the saved state and check that it fits ``optimizer``, changing nothing; returns the
    ``state_dict`` (tensors read) that :func:`apply_optimizer_state` loads."""
    saved, reader = read_saved_optimizer(locate_optimizer(checkpoint), verify=verify)
    try:
        skeleton, params = ostate.match_saved_to_live(saved, optimizer, ostate.param_names(optimizer, model))
        if reader is not None:
            ostate.materialize(skeleton, params, reader)
    finally:
        if reader is not None:
            reader.close()
    return skeleton


def apply_optimizer_state(
    optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], checkpoint: str | os.PathLike
) -> None:
    try:
        optimizer.load_state_dict(state_dict)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointFormatError(f"optimizer refused the loaded state: {exc}", path=checkpoint) from exc
