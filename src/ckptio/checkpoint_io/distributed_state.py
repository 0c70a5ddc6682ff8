"""Multi-rank save and load of a ``{name: tensor}`` state whose tensors are plain replicas
(DDP) or DTensors of any layout (FSDP2, tensor parallel). Model and optimizer state both
go through here, so both get the same parallel writes and the same resharding loads.

Save (every rank calls it; see :func:`save_state`, or :func:`write_state` to write into a
staging folder someone else commits, as ``save_checkpoint`` does):
  1. *describe*: every rank reports its keys, full shapes and the box it holds. One gather;
     ranks that disagree about keys fail together.
  2. *plan*: :func:`~ckptio.planning.plan.plan_owned_files` (pure, same on every rank).
  3. *begin*: the master creates the staging folder (its token broadcast to all).
  4. *write*: file by file, each tensor is collected on its file's owner (point-to-point,
     only for DTensors) and the owner writes the file as soon as it is complete, so a rank
     holds at most its own shards plus one file of full tensors.
  5. *commit*: records are gathered to the master, which writes the index, extra files
     and manifest and swaps the folder into place.
Each step is a :func:`~ckptio.planning.collectives.collective_step`: any rank's failure is
raised on all ranks, and the master removes the staging folder.

Load (:func:`load_state`): every rank locates the checkpoint, checks the headers against
the full shapes of its live tensors (same verdict on every rank), then reads only the box
it holds of each tensor from the files that contain it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptio.checkpoint_io.distributed_tensors import (
    BoxReader,
    Region,
    gather_full,
    is_dtensor,
    local_part,
    local_region,
    without_partial,
)
from ckptio.checkpoint_io.model_files import (
    ModelCheckpoint,
    ModelSaveOptions,
    locate_model,
    match_files_to_model,
    write_weights_file,
)
from ckptio.checkpoint_io.model_state import LoadReport
from ckptio.errors import CheckpointCorruptError, CheckpointError, StateMismatchError
from ckptio.planning.collectives import Group, collective_step, report_errors
from ckptio.planning.plan import OwnedFilePlan, plan_owned_files
from ckptio.storage import atomic
from ckptio.storage.base import FileRecord, FileWriter
from ckptio.storage.verify import check_against_manifest


@dataclass(frozen=True)
class _Described:
    keys: tuple[tuple[str, str, tuple[int, ...]], ...]  # (key, dtype, full shape)
    regions: tuple[Region, ...]


def _describe(state: dict[str, torch.Tensor]) -> _Described:
    keys = tuple((k, str(t.dtype), tuple(int(d) for d in t.shape)) for k, t in state.items())
    return _Described(keys, tuple(local_region(t) for t in state.values()))


def _check_same_keys(described: list[_Described]) -> None:
    first = described[0].keys
    for rank, d in enumerate(described[1:], start=1):
        if d.keys != first:
            ours, theirs = {k[0]: k for k in first}, {k[0]: k for k in d.keys}
            diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise CheckpointError(
                f"ranks disagree on the state to save: rank 0 and rank {rank} differ on {diff[:5]} "
                "(every rank must pass the same model / optimizer)"
            )


@dataclass(frozen=True)
class WriteSpec:
    """The files a multi-rank write produces: ``weights_name`` shards (or one file when
    ``shard`` is False) of at most ``max_shard_bytes``, safetensors or torch format."""

    weights_name: str
    max_shard_bytes: int
    shard: bool = True
    use_safetensors: bool = True

    @classmethod
    def for_model(cls, opts: ModelSaveOptions) -> WriteSpec:
        return cls(opts.weights_name, opts.max_shard_bytes, opts.shard, opts.use_safetensors)


def write_state(
    state: dict[str, torch.Tensor],
    writer: FileWriter,
    spec: WriteSpec,
    group: Group,
    *,
    subdir: str = "",
    single_file_name: str | None = None,
) -> tuple[OwnedFilePlan, list[FileRecord]]:
    """Steps 1, 2 and 4 of a save, into a staging ``writer`` that every rank shares.

    Collective; returns the plan (same on every rank) and the records of the files this
    rank wrote. Any rank's failure is raised on every rank, after all of them finished the
    loop of collectives. ``single_file_name`` replaces the file name when ``spec.shard`` is
    False (a :class:`~ckptio.storage.atomic.FileCommit` staging name).
    """
    state = {k: without_partial(v) for k, v in state.items()}
    described = collective_step(group, "describing the state to save", lambda: _describe(state), gather=True)
    _check_same_keys(described)
    plan = _plan(described[0].keys, spec, group.size)
    regions = {k: [d.regions[i] for d in described] for i, (k, _, _) in enumerate(described[0].keys)}
    prefix = f"{subdir}/" if subdir else ""
    records, error = _write_files(state, plan, regions, writer, spec, group, prefix, single_file_name)
    report_errors(group, f"writing {spec.weights_name} files", error)
    return plan, records


def _plan(keys, spec: WriteSpec, world_size: int) -> OwnedFilePlan:
    sizes = [(k, torch.Size(shape).numel() * _dtype(dt).itemsize) for k, dt, shape in keys]
    return plan_owned_files(
        sizes, world_size, weights_name=spec.weights_name, max_shard_bytes=spec.max_shard_bytes, shard=spec.shard
    )


def writer_of_each_key(state: dict[str, torch.Tensor], spec: WriteSpec, world_size: int) -> dict[str, int]:
    """The rank that will write each key, as :func:`write_state` will plan it: computed locally
    from full shapes, so a background save can stage on each rank only what it needs."""
    plan = _plan(_describe(state).keys, spec, world_size)
    return {key: owner for (_, keys), owner in zip(plan.files, plan.owners) for key in keys}


MetadataWriter = Callable[[FileWriter, OwnedFilePlan], list[FileRecord]]


def save_state(
    state: dict[str, torch.Tensor],
    checkpoint: str | os.PathLike,
    spec: WriteSpec,
    group: Group,
    *,
    owns=None,
    metadata: MetadataWriter | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> OwnedFilePlan:
    """Save ``state`` from every rank of ``group`` as one committed checkpoint.

    Sharded: a folder at ``checkpoint`` (``owns`` says which entries of an existing folder
    it replaces); after the files, the master calls ``metadata(writer, plan)`` to write the
    index and extra files. Not sharded: one file written by the master. ``manifest_extra``
    goes into the manifest (e.g. the parallel layout, for inspection). Returns the plan.
    """
    is_master = group.rank == 0
    token = group.broadcast_object(atomic.new_token() if is_master else None)
    if spec.shard:
        kwargs = {"owns": owns} if owns is not None else {}
        commit: Any = atomic.FolderCommit(checkpoint, token=token, **kwargs)
        single_name = None
    else:
        commit = atomic.FileCommit(checkpoint, token=token)
        single_name = commit.staging_name
    try:
        collective_step(group, f"starting the save of {checkpoint}", lambda: commit.begin() if is_master else None)
        plan, records = write_state(state, commit.writer, spec, group, single_file_name=single_name)
        all_records = collective_step(group, f"collecting the files of {checkpoint}", lambda: records, gather=True)

        def finish() -> None:
            if not is_master:
                return
            flat = [r for per_rank in all_records for r in per_rank]
            if not spec.shard:
                commit.commit(flat[0] if flat else None)
                return
            if metadata is not None:
                flat.extend(metadata(commit.writer, plan))
            # who really wrote each file: the records each rank returned
            writers = {rec.name: rank for rank, recs in enumerate(all_records) for rec in recs}
            extra = {**(manifest_extra or {}), "written_by_rank": writers, "world_size": group.size}
            commit.commit(flat, manifest_extra=extra)

        collective_step(group, f"committing {checkpoint}", finish)
    except BaseException:
        if is_master:
            commit.abort()
        raise
    return plan


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _rounds(plan: OwnedFilePlan, world: int) -> list[list[int]]:
    """File indices in rounds: round ``i`` holds the ``i``-th file of every owner, so all
    owners write at the same time instead of one after the other."""
    per_owner = [plan.files_of(r) for r in range(world)]
    depth = max((len(files) for files in per_owner), default=0)
    return [[files[i] for files in per_owner if i < len(files)] for i in range(depth)]


def _write_files(state, plan: OwnedFilePlan, regions, writer, spec: WriteSpec, group: Group, prefix, single_name):
    """The write loop, round by round: collect the tensors of this round's files on their
    owners, then every owner writes its file. A local failure stops this rank's writing but
    not its part in the collectives; the error is reported after the loop."""
    rank = group.rank
    records: list[FileRecord] = []
    error: BaseException | None = None
    for round_files in _rounds(plan, group.size):
        mine: tuple[str, list] | None = None
        for index in round_files:
            (name, keys), owner = plan.files[index], plan.owners[index]
            tensors = []
            for key in keys:
                full = gather_full(state[key], regions[key], owner, group)
                if full is not None:
                    tensors.append((key, full))
            if owner == rank:
                mine = (name, tensors)
        if mine is None or error is not None:
            continue
        try:
            file_name = single_name if single_name is not None else prefix + mine[0]
            records.append(write_weights_file(writer, file_name, mine[1], use_safetensors=spec.use_safetensors))
        except Exception as exc:  # noqa: BLE001 (reported to every rank after the loop)
            error = exc
        del mine
    return records, error


# ------------------------------------------------------------------------------ loading


@dataclass
class _LoadPlan:
    ck: ModelCheckpoint
    per_file: list[tuple[str, list[tuple[str, str]]]]
    report: LoadReport


def _box_reader_shapes(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    reader = BoxReader(path)
    try:
        return reader.shapes()
    finally:
        reader.close()


def _plan_load(dest: dict[str, torch.Tensor], checkpoint, aliases: dict[str, str], verify: bool) -> _LoadPlan:
    ck = locate_model(checkpoint)
    per_file, report = match_files_to_model(ck, dest, aliases, _box_reader_shapes)
    # Each rank checks the sizes (and checksums) of the files it will read.
    needed = [name for name, todo in per_file if todo]
    check_against_manifest(ck.folder, needed, checksums=verify)
    return _LoadPlan(ck, per_file, report)


def _copy_into(reader: BoxReader, file_key: str, live: torch.Tensor) -> None:
    if not is_dtensor(live):
        reader.read_box(file_key, Region((0,) * live.dim(), tuple(live.shape)), live.detach())
        return
    region = local_region(live)
    local = local_part(live).detach()
    if region.box:
        if region.numel:
            reader.read_box(file_key, region, local)
        return
    from torch.distributed.tensor import distribute_tensor

    full = reader.read_full(file_key)
    local.copy_(distribute_tensor(full, live.device_mesh, live.placements, src_data_rank=None).to_local())


def load_state(
    dest: dict[str, torch.Tensor],
    checkpoint: str | os.PathLike,
    group: Group,
    *,
    strict: bool = True,
    aliases: dict[str, str] | None = None,
    verify: bool = False,
) -> LoadReport:
    """Load a checkpoint (any supported layout, saved at any world size) into the live
    tensors ``dest`` in place; each rank reads only the boxes of the tensors it holds.

    Every rank reaches the same verdict on keys, shapes and dtypes; with ``strict=True`` a
    misfit raises :class:`StateMismatchError` on every rank before anything is written.
    """
    aliases = aliases or {}
    plan: _LoadPlan = collective_step(
        group, f"checking {checkpoint}", lambda: _plan_load(dest, checkpoint, aliases, verify)
    )
    if strict and not plan.report.ok:
        raise StateMismatchError(
            f"checkpoint does not fit (strict=True): {plan.report.describe()}", path=checkpoint, report=plan.report
        )
    error: BaseException | None = None
    try:
        with torch.no_grad():
            for name, todo in plan.per_file:
                if not todo:
                    continue
                reader = BoxReader(plan.ck.folder / name)
                try:
                    for file_key, live_key in todo:
                        _copy_into(reader, file_key, dest[live_key])
                except CheckpointError:
                    raise
                except (OSError, RuntimeError) as exc:
                    raise CheckpointCorruptError(f"reading tensors failed: {exc}", path=plan.ck.folder / name) from exc
                finally:
                    reader.close()
    except Exception as exc:  # noqa: BLE001 (reported to every rank below)
        error = exc
    report_errors(group, f"loading {checkpoint}", error)
    return plan.report


def state_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map each alias key (tied weights) to the first key holding the same tensor.

    DTensors are compared by object identity (a tied parameter is one object), plain tensors
    by storage, so every rank finds the same aliases whatever its shard holds.
    """
    first: dict[object, str] = {}
    aliases: dict[str, str] = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        if is_dtensor(t):
            ident: object = ("dtensor", id(t))
        elif t.numel() == 0 or t.device.type == "meta":
            continue
        else:
            ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases
