"""Writing safetensors files in place, from every rank at once, with nothing sent that need not be.

A safetensors file is a header computed from the names, dtypes and shapes alone, then every
tensor's bytes back to back, so the place of every byte of every file is known before any is
written. The files are planned as one process would write them (:mod:`ckptio.engine.plan`);
then each file's owner creates it (the header, and the file's final size) and every rank
writes its own pieces at their offsets:

* a box of a sharded DTensor that is contiguous in the file (``Shard(0)`` rows of a row-major
  tensor, a whole tensor) is written by the lowest rank holding it, straight from its memory:
  FSDP2 shards never cross the network;
* a replicated tensor (DDP, ``Replicate``) is written by one rank chosen to balance the bytes
  each rank writes (:func:`ckptio.engine.plan.replica_writers`), so replicas are written in parallel too;
* only a tensor with a box that is not contiguous in the file (``Shard(1)``, strided layouts)
  is collected on the file's owner (point to point, as :mod:`ckptio.engine.write` does) and
  written by it.

Every rank makes what it wrote durable (fsync) before the file's owner reads the file back
for its size and checksum (no single rank saw all its bytes). The files are byte-identical
to a one-process save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ckptio.engine.gather import gather_full
from ckptio.engine.group import Group, collective_step, report_errors
from ckptio.engine.plan import FilePlan
from ckptio.engine.spread import Spread
from ckptio.engine.tensors import Region, StagedPart, is_dtensor, local_region
from ckptio.formats import dtypes, safetensors_format
from ckptio.storage.base import FileRecord, FileWriter, PositionalFile

SAFETENSORS_METADATA = {"format": "pt"}

Meta = dict[str, tuple[torch.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class FileLayout:
    """Where everything of one safetensors file goes: its header and each tensor's first byte."""

    name: str
    header: bytes
    size: int
    starts: dict[str, int]


def file_layout(name: str, keys: tuple[str, ...], meta: Meta) -> FileLayout:
    """The layout ``safetensors_format.iter_file_chunks`` produces for these tensors, in order."""
    entries = [(k, meta[k][0], meta[k][1]) for k in keys]
    header = safetensors_format.build_header(entries, SAFETENSORS_METADATA)
    starts, at = {}, len(header)
    for key, dtype, shape in entries:
        starts[key] = at
        at += math.prod(shape) * dtypes.element_size(dtype)
    return FileLayout(name, header, at, starts)


def flat_offset(region: Region, shape: tuple[int, ...]) -> int:
    """The row-major element index of a box's first element."""
    index, stride = 0, 1
    for d in range(len(shape) - 1, -1, -1):
        index += region.offset[d] * stride
        stride *= shape[d]
    return index


def _local_bytes(t, region: Region) -> memoryview:
    """This rank's bytes of ``region`` of tensor ``t`` (its whole replica, or its box)."""
    if isinstance(t, StagedPart):
        local = t.local
    elif is_dtensor(t):
        local = t.to_local()
    else:
        local = t
    local = local.detach()
    if local.device.type != "cpu" or not local.is_contiguous():
        local = local.cpu().contiguous()
    if local.numel() != region.numel:
        raise RuntimeError(f"holds {local.numel()} elements of a box of {region.numel}")
    return safetensors_format.tensor_bytes(local)


@dataclass(frozen=True)
class Step:
    """One thing a rank does for a save in place, in the order every rank walks the files:
    write its ``region`` of ``key`` at byte ``offset`` of file ``file``, or (``gather``) take
    part in collecting ``key`` on the file's owner, which writes it whole at ``offset``."""

    file: int
    key: str
    offset: int
    region: Region | None = None
    gather: bool = False


def rank_steps(plan: FilePlan, meta: Meta, spreads: dict[str, Spread], layouts: list[FileLayout], rank: int):
    """What ``rank`` does (pure; O(tensors) time and memory whatever the number of ranks: each
    rank derives its own pieces from the spreads, nobody lists everyone's)."""
    steps = []
    for i, (_, keys) in enumerate(plan.files):
        for key in keys:
            dtype, shape = meta[key]
            if not math.prod(shape):
                continue
            spread = spreads[key]
            start = layouts[i].starts[key]
            if not spread.contiguous:  # collected on the owner: every rank takes part, in order
                steps.append(Step(i, key, start, gather=True))
            elif spread.writes(rank):
                region = spread.box(rank)
                steps.append(Step(i, key, start + flat_offset(region, shape) * dtypes.element_size(dtype), region))
    return steps


def write_in_place(
    state: dict, plan: FilePlan, meta: Meta, spreads: dict[str, Spread], writer: FileWriter,
    group: Group, names: list[str],
) -> list[FileRecord]:  # fmt: skip
    """Create, fill and check every file of ``plan`` from every rank (collective); returns the
    records of the files this rank owns. Any rank's failure is raised on every rank.

    Each rank works out its own pieces from the spreads alone (:func:`rank_steps`): for a tensor
    whose boxes are all contiguous, the box this rank writes (if any); the others are collected
    on the file's owner.
    """
    rank = group.rank
    layouts = [file_layout(names[i], keys, meta) for i, (_, keys) in enumerate(plan.files)]
    mine = plan.files_of(rank)
    collective_step(
        group,
        f"creating {len(plan.files)} files to write in place",
        lambda: [writer.create(layouts[i].name, layouts[i].size, layouts[i].header) for i in mine],
    )
    opened: dict[int, PositionalFile] = {}
    error: BaseException | None = None

    def file(i: int) -> PositionalFile:
        if i not in opened:
            opened[i] = writer.open_at(layouts[i].name)
        return opened[i]

    try:
        for step in rank_steps(plan, meta, spreads, layouts, rank):
            if step.gather:  # collective: every rank, same order, even after a local failure
                full = gather_full(state[step.key], spreads[step.key], plan.owners[step.file], group)
                if full is not None and error is None:
                    try:
                        whole = Region((0,) * full.dim(), tuple(full.shape))
                        file(step.file).write_at(step.offset, [_local_bytes(full, whole)])
                    except Exception as exc:  # noqa: BLE001 (reported to every rank below)
                        error = exc
                continue
            if error is not None:
                continue
            try:
                region = local_region(state[step.key])
                if region != step.region:
                    raise RuntimeError(f"{step.key}: holds box {region}, the plan expects {step.region}")
                file(step.file).write_at(step.offset, [_local_bytes(state[step.key], region)])
            except Exception as exc:  # noqa: BLE001 (reported to every rank below)
                error = exc
    finally:
        for handle in opened.values():
            try:
                handle.close()  # durable before anyone reads the file back
            except Exception as exc:  # noqa: BLE001
                error = error or exc
    report_errors(group, f"writing {len(plan.files)} files in place", error)
    return collective_step(
        group, "checking the files written in place", lambda: [writer.record_of(layouts[i].name) for i in mine]
    )
