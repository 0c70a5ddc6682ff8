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

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass

import torch

from ckptio.engine.gather import gather_full
from ckptio.engine.group import Group, collective_step, report_errors
from ckptio.engine.plan import FilePlan
from ckptio.engine.spread import Spread
from ckptio.engine.tensors import Region, StagedPart, is_dtensor, local_region
from ckptio.formats import dtypes, safetensors_format
from ckptio.storage.base import FileRecord, FileWriter, PositionalFile, new_hasher

SAFETENSORS_METADATA = {"format": "pt"}

Meta = dict[str, tuple[torch.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class FileLayout:
    """Where everything of one safetensors file goes: its header and each tensor's first byte."""

    name: str
    header: bytes
    size: int
    starts: dict[str, int]


def file_layout(name: str, keys: tuple[str, ...], meta: Meta, metadata: dict[str, str] | None = None) -> FileLayout:
    """The layout ``safetensors_format.iter_file_chunks`` produces for these tensors, in order
    (``metadata``: the header's ``__metadata__``, ``{"format": "pt"}`` by default)."""
    entries = [(k, meta[k][0], meta[k][1]) for k in keys]
    header = safetensors_format.build_header(entries, metadata or SAFETENSORS_METADATA)
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


def _local_tensor(t) -> torch.Tensor:
    """This rank's part of ``t`` (its box, or whole replica) as contiguous CPU memory."""
    local = t.local if isinstance(t, StagedPart) else t.to_local() if is_dtensor(t) else t
    local = local.detach()
    return local if local.device.type == "cpu" and local.is_contiguous() else local.cpu().contiguous()


class Pieces:
    """The hashes of the pieces this rank contributes to each file, and each file's fingerprint.

    A piece is what one rank puts into a file: the header (the file's owner), a box it writes
    at an offset, or the local box it sends to the owner of a tensor collected there. A file's
    fingerprint hashes every rank's pieces (position and xxh3-128 of the bytes), so two saves
    from the same layout give the same fingerprint exactly when they put the same bytes in the
    file, and a save can tell that before it writes: the fingerprint is what
    :attr:`FileRecord.pieces` records for the next save to compare with.
    """

    def __init__(self) -> None:
        self._pieces: dict[int, list[tuple]] = {}

    def add(self, file: int, where: tuple, data: memoryview | bytes) -> None:
        hasher = new_hasher()
        hasher.update(data)
        self._pieces.setdefault(file, []).append((*where, len(data), hasher.hexdigest()))

    def digests(self) -> dict[int, str]:
        """One digest per file of this rank's pieces, for the exchange."""
        out = {}
        for file, pieces in self._pieces.items():
            hasher = new_hasher()
            hasher.update(repr(sorted(pieces)).encode())
            out[file] = hasher.hexdigest()
        return out

    @staticmethod
    def fingerprints(gathered: list[dict[int, str]], files: int) -> list[str]:
        """Each file's fingerprint from every rank's digests (the same on every rank)."""
        out = []
        for file in range(files):
            hasher = new_hasher()
            hasher.update(repr(sorted(d[file] for d in gathered if file in d)).encode())
            out.append(hasher.hexdigest())
        return out


def _hash_pieces(state: dict, steps: list[Step], spreads, layouts: list[FileLayout], rank, owners, files) -> Pieces:
    """This rank's pieces of ``files``, hashed without writing (local work only)."""
    pieces = Pieces()
    for i in files:
        if owners[i] == rank:
            pieces.add(i, ("header",), layouts[i].header)
    for step in steps:
        if step.file in files:
            _hash_step(pieces, state, step, spreads, rank)
    return pieces


def _hash_step(pieces: Pieces, state: dict, step: Step, spreads, rank: int) -> None:
    t = state.get(step.key)
    if t is None:  # a key this rank does not hold (ranks holding different keys) puts nothing here
        return
    if not step.gather:
        pieces.add(step.file, ("at", step.offset), _local_bytes(t, step.region))
        return
    region = local_region(t)
    if region.numel and (spreads[step.key].writes(rank) or not region.box):
        where = ("box", step.offset, tuple(region.offset), tuple(region.shape), region.box)
        pieces.add(step.file, where, safetensors_format.tensor_bytes(_local_tensor(t)))


def write_in_place(
    state: dict, plan: FilePlan, meta: Meta, spreads: dict[str, Spread], writer: FileWriter,
    group: Group, names: list[str], metadata: dict[str, str] | None = None, static: Collection[str] = (),
) -> list[FileRecord]:  # fmt: skip
    """Create, fill and check every file of ``plan`` from every rank (collective); returns the
    records of the files this rank owns. Any rank's failure is raised on every rank.

    Each rank works out its own pieces from the spreads alone (:func:`rank_steps`): for a tensor
    whose boxes are all contiguous, the box this rank writes (if any); the others are collected
    on the file's owner. ``metadata``: the ``__metadata__`` of the headers.

    A file of ``static`` tensors for which :attr:`FileWriter.reuse` holds a file of the same
    size is first hashed piece by piece on every rank; if an earlier save from the same layout
    wrote the same pieces (the fingerprints agree), the owner links that file and nobody writes it.
    """
    rank = group.rank
    layouts = [file_layout(names[i], keys, meta, metadata) for i, (_, keys) in enumerate(plan.files)]
    steps = rank_steps(plan, meta, spreads, layouts, rank)
    reusable = [i for i, (_, keys) in enumerate(plan.files) if set(keys) <= set(static)]
    reused = _link_unchanged(state, plan, spreads, layouts, steps, writer, group, reusable)
    mine = [i for i in plan.files_of(rank) if i not in reused]
    collective_step(
        group,
        f"creating {len(plan.files) - len(reused)} files to write in place",
        lambda: [writer.create(layouts[i].name, layouts[i].size, layouts[i].header) for i in mine],
    )
    opened: dict[int, PositionalFile] = {}
    error: BaseException | None = None
    pieces = Pieces()
    for i in mine:
        pieces.add(i, ("header",), layouts[i].header)

    def file(i: int) -> PositionalFile:
        if i not in opened:
            opened[i] = writer.open_at(layouts[i].name)
        return opened[i]

    try:
        for step in steps:
            if step.file in reused:
                continue
            if step.gather:  # collective: every rank, same order, even after a local failure
                owner, dtype = plan.owners[step.file], meta[step.key][0]
                full = gather_full(state.get(step.key), spreads[step.key], owner, group, dtype)
                if error is None:
                    try:
                        _hash_step(pieces, state, step, spreads, rank)
                        if full is not None:
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
                data = _local_bytes(state[step.key], region)
                pieces.add(step.file, ("at", step.offset), data)
                file(step.file).write_at(step.offset, [data])
            except Exception as exc:  # noqa: BLE001 (reported to every rank below)
                error = exc
    finally:
        for handle in opened.values():
            try:
                handle.close()  # durable before anyone reads the file back
            except Exception as exc:  # noqa: BLE001
                error = error or exc
    report_errors(group, f"writing {len(plan.files)} files in place", error)
    gathered = collective_step(group, "exchanging the hashes of the pieces written", pieces.digests, gather=True)
    fingerprints = Pieces.fingerprints(gathered, len(plan.files))
    written = collective_step(
        group,
        "checking the files written in place",
        lambda: [dataclasses.replace(writer.record_of(layouts[i].name), pieces=fingerprints[i]) for i in mine],
    )
    return written + [reused[i] for i in plan.files_of(rank) if i in reused]


def _link_unchanged(state, plan: FilePlan, spreads, layouts, steps, writer: FileWriter, group: Group, files) -> dict:
    """The files an earlier checkpoint of :attr:`FileWriter.reuse` already holds, linked by
    their owners: ``{file index: record}`` (records on their owner only, the keys everywhere).

    Only ``files`` (of static tensors) of a size the index holds are hashed (every rank hashes its pieces of them, one
    exchange of digests), so a save with nothing to reuse costs nothing here."""
    reuse = writer.reuse
    candidates = [i for i in files if reuse is not None and reuse.has_size(layouts[i].size)]
    if not candidates:
        return {}
    rank = group.rank
    hashed = _hash_pieces(state, steps, spreads, layouts, rank, plan.owners, set(candidates))
    gathered = collective_step(group, "hashing the pieces of files that may be unchanged", hashed.digests, gather=True)
    fingerprints = Pieces.fingerprints(gathered, len(plan.files))
    found = {i: reuse.by_layout(layouts[i].size, fingerprints[i]) for i in candidates}

    def link_mine() -> dict:
        out = {}
        for i, source in found.items():
            if source is not None and plan.owners[i] == rank:
                record = writer.link(layouts[i].name, source)
                if record is not None:
                    out[i] = record
        return out

    linked = collective_step(group, "linking unchanged files", link_mine, gather=True)
    return {i: record for per_rank in linked for i, record in per_rank.items()}
