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
  each rank writes (:func:`replica_writers`), so replicas are written in parallel too;
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

from ckptio.engine.group import Group, collective_step, report_errors
from ckptio.engine.plan import FilePlan
from ckptio.engine.split import assign_owners
from ckptio.engine.tensors import Region, StagedPart, gather_full, is_dtensor, sources
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


def is_contiguous(region: Region, shape: tuple[int, ...]) -> bool:
    """Whether a box's elements are one run in row-major order: leading dims of extent 1, then
    one dim cut anywhere, then whole dims."""
    dims = len(shape)
    k = next((d for d in range(dims) if region.shape[d] != 1), dims)
    return all(region.shape[d] == shape[d] for d in range(k + 1, dims))


def flat_offset(region: Region, shape: tuple[int, ...]) -> int:
    """The row-major element index of a box's first element."""
    index, stride = 0, 1
    for d in range(len(shape) - 1, -1, -1):
        index += region.offset[d] * stride
        stride *= shape[d]
    return index


def is_replica(regions: list[Region], shape: tuple[int, ...]) -> bool:
    """Every rank holds the whole tensor (a plain tensor under DDP, a replicated DTensor)."""
    return all(r.box and r.shape == shape for r in regions)


def replica_writers(sizes: list[tuple[str, int]], world_size: int) -> dict[str, int]:
    """Which rank writes each replicated tensor: byte-balanced, largest first, ties to the
    lowest rank, so every rank computes the same answer (at staging time too)."""
    owners = assign_owners([n for _, n in sizes], world_size)
    return {key: owner for (key, _), owner in zip(sizes, owners)}


@dataclass(frozen=True)
class Piece:
    """Bytes of one tensor that one rank writes: the box ``region`` starting at byte ``offset``."""

    file: int
    key: str
    region: Region
    offset: int


@dataclass(frozen=True)
class InPlacePlan:
    layouts: tuple[FileLayout, ...]
    pieces: dict[str, list[tuple[int, Piece]]]  # key -> [(rank, piece)]
    gathered: frozenset[str]  # keys collected on their file's owner


def plan_pieces(plan: FilePlan, meta: Meta, regions: dict[str, list[Region]], world: int, names) -> InPlacePlan:
    """Who writes which bytes where (pure: the same on every rank)."""
    layouts = tuple(file_layout(names[i], keys, meta) for i, (_, keys) in enumerate(plan.files))
    file_of = {key: i for i, (_, keys) in enumerate(plan.files) for key in keys}
    replicas = [k for k, (_, shape) in meta.items() if k in file_of and is_replica(regions[k], shape)]
    writers = replica_writers([(k, _nbytes(meta[k])) for k in replicas], world)
    pieces: dict[str, list[tuple[int, Piece]]] = {}
    gathered = set()
    for key, i in file_of.items():
        dtype, shape = meta[key]
        if not math.prod(shape):
            continue
        start = layouts[i].starts[key]
        full = Region((0,) * len(shape), shape)
        if key in writers:
            pieces[key] = [(writers[key], Piece(i, key, full, start))]
            continue
        if not all(r.box for r in regions[key]) or not all(is_contiguous(r, shape) for _, r in sources(regions[key])):
            gathered.add(key)
            continue
        item = dtypes.element_size(dtype)
        pieces[key] = [
            (rank, Piece(i, key, region, start + flat_offset(region, shape) * item))
            for rank, region in sources(regions[key])
        ]
    return InPlacePlan(layouts, pieces, frozenset(gathered))


def _nbytes(meta_entry) -> int:
    dtype, shape = meta_entry
    return math.prod(shape) * dtypes.element_size(dtype)


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


def write_in_place(
    state: dict, plan: FilePlan, meta: Meta, regions: dict[str, list[Region]], writer: FileWriter,
    group: Group, names: list[str],
) -> list[FileRecord]:  # fmt: skip
    """Create, fill and check every file of ``plan`` from every rank (collective); returns the
    records of the files this rank owns. Any rank's failure is raised on every rank."""
    rank = group.rank
    layout = plan_pieces(plan, meta, regions, group.size, names)
    mine = plan.files_of(rank)
    collective_step(
        group,
        f"creating {len(plan.files)} files to write in place",
        lambda: [writer.create(layout.layouts[i].name, layout.layouts[i].size, layout.layouts[i].header) for i in mine],
    )
    opened: dict[int, PositionalFile] = {}
    error: BaseException | None = None

    def file(i: int) -> PositionalFile:
        if i not in opened:
            opened[i] = writer.open_at(layout.layouts[i].name)
        return opened[i]

    try:
        for i, (_, keys) in enumerate(plan.files):
            for key in keys:
                if key in layout.gathered:  # collective: every rank, same order, even after a local failure
                    full = gather_full(state[key], regions[key], plan.owners[i], group)
                    if full is not None and error is None:
                        try:
                            whole = Region((0,) * full.dim(), tuple(full.shape))
                            file(i).write_at(layout.layouts[i].starts[key], [_local_bytes(full, whole)])
                        except Exception as exc:  # noqa: BLE001 (reported to every rank below)
                            error = exc
                    continue
                if error is not None:
                    continue
                for writer_rank, piece in layout.pieces.get(key, ()):
                    if writer_rank == rank:
                        try:
                            file(i).write_at(piece.offset, [_local_bytes(state[key], piece.region)])
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
        group, "checking the files written in place", lambda: [writer.record_of(layout.layouts[i].name) for i in mine]
    )
