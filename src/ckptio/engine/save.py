"""Every save, one orchestration: parts written into one commit, in the caller's thread or in
the background.

A save is a list of :class:`Part`\\ s (a model's weights, an optimizer, a scheduler file, a
training checkpoint's running states and RNG files) written into one
:class:`~ckptio.storage.base.Commit`, which the storage picks (a staging folder renamed into
place, or a version prefix and a commit marker). :func:`save_parts` runs the steps on every
rank of a group: the master's token travels to all, the master begins, every rank writes its
parts, the master commits with every rank's records (or aborts if any rank failed).

An async save asks each part, in the caller's thread, for what it would copy
(:meth:`Part.stage_request`: references to what this rank contributes, no copy), then, on a
background thread, copies it into reused host buffers (:func:`stage_all`, a collective step on
the background group) and runs the same :func:`save_parts` on the copies over that group. The
same code writes sync and async, one rank or many.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ckptio.async_io.staging import Snapshot, StagingProgress, rebuild_tree, tree_snapshot
from ckptio.engine.group import Group, collective_step
from ckptio.engine.plan import FilePlan
from ckptio.engine.spread import HeldSpread, SpreadOf
from ckptio.engine.tensors import can_stage_parts, stage_parts, staged_parts
from ckptio.engine.write import WriteSpec, replica_writer_of_each_key, write_state
from ckptio.storage.atomic import new_token
from ckptio.storage.base import FileRecord, FileWriter, ReuseIndex, check_abandoned
from ckptio.storage.location import new_commit

Metadata = Callable[[FilePlan], dict[str, bytes]]


@dataclass
class StageRequest:
    """What one part of an async save needs copied (``snapshot``, None for a part that holds no
    live tensors), and how to make the part that writes the copies (``build``)."""

    snapshot: Snapshot | None
    build: Callable[[dict[Any, Any]], Part]


def _join(subdir: str, name: str) -> str:
    return f"{subdir}/{name}" if subdir else name


class Part(ABC):
    """One piece of a save. ``group`` holds its state (its collectives run there); a part whose
    state one process holds alone (``master_only``) is written by the commit's master only."""

    group: Group
    master_only: bool = False

    @abstractmethod
    def write(self, writer: FileWriter, file_name: str | None) -> list[FileRecord]:
        """Write this rank's files (``file_name``: the only file of a one-file commit); collective on ``group``."""

    def stageable(self) -> bool:
        """Whether :meth:`stage` needs no collective on the live state's mesh."""
        return True

    @abstractmethod
    def stage_request(self, background: Group) -> StageRequest:
        """In the caller's thread: the live tensors this rank contributes (no copy yet), and how to
        make from their copies a part that no longer reads live state, its collectives on
        ``background`` (a part held by one process keeps its world of one)."""


class TensorPart(Part):
    """A ``{name: tensor}`` state (model weights, an optimizer's state tensors) written through
    the engine, then ``metadata(plan)`` files (index, ``config.json``) by the group's master.
    ``static``: the keys that do not change between saves (frozen parameters), planned into
    shards of their own. ``keys_differ``: the ranks hold different keys (pipeline stages); such
    a part saves synchronously (staging decides who writes a replica without the other ranks' keys)."""

    def __init__(
        self,
        state: dict[str, Any],
        spec: WriteSpec,
        group: Group,
        *,
        subdir: str = "",
        metadata: Metadata | None = None,
        slot: str = "model",
        master_only: bool = False,
        static: frozenset[str] = frozenset(),
        keys_differ: bool = False,
    ) -> None:
        self.state, self.spec, self.group, self.subdir = state, spec, group, subdir
        self.metadata, self.slot, self.master_only, self.static = metadata, slot, master_only, static
        self.keys_differ = keys_differ

    def write(self, writer: FileWriter, file_name: str | None) -> list[FileRecord]:
        plan, records = write_state(
            self.state, writer, self.spec, self.group, subdir=self.subdir, file_name=file_name, static=self.static,
            keys_differ=self.keys_differ,
        )  # fmt: skip
        if self.metadata is None:
            return records
        group, subdir, metadata = self.group, self.subdir, self.metadata

        def write_metadata() -> list[FileRecord]:
            if group.rank != 0:
                return []
            return [writer.write(_join(subdir, name), [body]) for name, body in metadata(plan).items()]

        return records + collective_step(group, f"writing the index of {self.spec.weights_name}", write_metadata)

    def stageable(self) -> bool:
        return not self.keys_differ and can_stage_parts(self.state)

    def stage_request(self, background: Group) -> StageRequest:
        writer_of = replica_writer_of_each_key(self.state, self.group)
        spread_of = SpreadOf(self.group.rank_of_global(), self.group.size)
        spreads = {}
        for k, t in self.state.items():
            spread = spread_of(t)
            # a replica is staged by its writer alone: the others hold nothing of it
            spreads[k] = HeldSpread(tuple(int(d) for d in t.shape), writer_of[k]) if spread == "whole" else spread
        needed = stage_parts(self.state, writer_of, self.group.rank)
        state, group = self.state, self.group if not self.group.active else background

        def build(copies: dict[Any, Any]) -> TensorPart:
            return TensorPart(
                staged_parts(state, copies, spreads), self.spec, group, subdir=self.subdir, metadata=self.metadata,
                slot=self.slot, master_only=self.master_only, static=self.static,
            )  # fmt: skip

        return StageRequest(Snapshot.of(self.slot, needed), build)


class FilesPart(Part):
    """Small files rendered to bytes when the save is called (LR scheduler, running states,
    a rank's RNG state): every rank writes its own ``files``, or only the master."""

    def __init__(self, files: dict[str, bytes], *, master_only: bool, subdir: str = "") -> None:
        self.files, self.master_only, self.subdir = files, master_only, subdir
        self.group = Group.of_one()

    def write(self, writer: FileWriter, file_name: str | None) -> list[FileRecord]:
        if file_name is not None:
            ((_, data),) = self.files.items()  # a one-file commit: its only file, under the commit's name
            return [writer.write(file_name, [data])]
        return [writer.write(_join(self.subdir, name), [data]) for name, data in self.files.items()]

    def stage_request(self, background: Group) -> StageRequest:
        return StageRequest(None, lambda copies: self)


class CallbackPart(Part):
    """A part whose writing is a function of ``(writer, file_name, group)`` over data gathered
    when the save is called (an optimizer gathered whole on the master)."""

    def __init__(
        self,
        gather: Callable[[Group], Any],
        write: Callable[[FileWriter, str | None, Any], list[FileRecord]],
        group: Group,
        *,
        slot: str,
        master_only: bool = False,
    ) -> None:
        self.gather, self.write_fn, self.group, self.slot, self.master_only = gather, write, group, slot, master_only
        self._data: Any = None
        self._gathered = False

    def _value(self) -> Any:
        if not self._gathered:
            self._data, self._gathered = self.gather(self.group), True
        return self._data

    def write(self, writer: FileWriter, file_name: str | None) -> list[FileRecord]:
        data, group = self._value(), self.group
        return collective_step(
            group, "writing a gathered state", lambda: self.write_fn(writer, file_name, data) if not group.rank else []
        )

    def stage_request(self, background: Group) -> StageRequest:
        data = self._value()  # gathered now, on the caller's group: a collective with training's ranks
        tree, snapshot = tree_snapshot(data, self.slot) if data is not None else (None, None)
        group = self.group if not self.group.active else background

        def build(copies: dict[Any, Any]) -> CallbackPart:
            part = CallbackPart(self.gather, self.write_fn, group, slot=self.slot, master_only=self.master_only)
            part._data, part._gathered = (rebuild_tree(tree, copies) if tree is not None else None), True
            return part

        return StageRequest(snapshot, build)


def save_parts(
    checkpoint: str | os.PathLike,
    parts: list[Part],
    group: Group,
    *,
    folder: bool,
    owns: Callable[[str], bool] | None = None,
    manifest_extra: dict[str, Any] | None = None,
    reuse: Sequence[str] | None = (),
) -> None:
    """Write ``parts`` from every rank of ``group`` into one commit of ``checkpoint``.

    ``folder`` False: a one-file save (exactly one part writes exactly one file). Any rank's
    failure aborts the commit and is raised on every rank; the previous checkpoint stays.
    Weights files whose bytes the folder being replaced or a committed folder of ``reuse``
    already holds are linked from it, not written (:mod:`ckptio.storage.reuse`); ``reuse=None``
    writes every byte.
    """
    is_master = group.rank == 0
    token = group.broadcast_object(new_token() if is_master else None, what="agreeing on the staging folder")
    commit = new_commit(checkpoint, folder=folder, token=token, owns=owns)
    where = os.fspath(checkpoint)

    def begin() -> ReuseIndex | None:
        if not is_master:
            return None
        commit.begin()
        return commit.reuse_index(reuse) if reuse is not None else None

    def write_here() -> list[FileRecord]:
        records: list[FileRecord] = []
        for part in parts:
            if part.master_only and not is_master:
                continue
            records += part.write(commit.writer, commit.file_name)
        return records

    try:
        # the master's index of what may be linked, on every rank (each links the files it owns)
        commit.writer.reuse = collective_step(group, f"starting the save of {where}", begin, gather=True)[0]
        per_rank = collective_step(group, f"writing {where}", write_here, gather=True)

        def finish() -> None:
            if not is_master:
                return
            check_abandoned(where)  # an exit that stopped waiting: abort rather than commit half a job
            flat = [r for records in per_rank for r in records]
            # who really wrote each weights file: the records each rank returned
            writers = {rec.name: rank for rank, records in enumerate(per_rank) for rec in records if rec.holds_tensors}
            extra = {**(manifest_extra or {}), "written_by_rank": writers, "world_size": group.size}
            reused = [r for r in flat if r.reused]
            if reused:  # linked from an earlier checkpoint: not a byte of them was written
                extra["reused"] = {"files": len(reused), "bytes": sum(r.size for r in reused)}
            commit.commit(flat, manifest_extra=extra)

        collective_step(group, f"committing {where}", finish)
    except Exception:
        # KeyboardInterrupt / SystemExit leave the staging area like a kill would; the next
        # save of this checkpoint clears it, and it is never read as a checkpoint.
        if is_master:
            commit.abort()
        raise


def request_stages(parts: list[Part], group: Group, background: Group, what: str) -> list[StageRequest]:
    """The call of an async save: what every part needs copied, no copy yet. One collective step
    on the caller's ``group``: a part that cannot be staged (meta tensors, a failed gather)
    raises from the call on every rank."""
    return collective_step(
        group, f"preparing the async save of {what}", lambda: [p.stage_request(background) for p in parts]
    )


def stage_all(
    requests: list[StageRequest], staging, background: Group, what: str, progress: StagingProgress | None = None
) -> list[Part]:
    """On the background thread: copy what this rank contributes to every part into reused host
    buffers (in ``progress``'s order, reporting to it), as one collective step on ``background``:
    one rank failing to copy fails the save on every rank, so no rank's writer waits for a peer
    that never started, and the error is raised on every rank by the next save or ``wait()``."""

    def copy() -> list[Part]:
        snapshots = [r.snapshot for r in requests if r.snapshot is not None]
        copies = iter(staging.copy(snapshots, progress))
        return [r.build(next(copies) if r.snapshot is not None else {}) for r in requests]

    return collective_step(background, f"staging {what}", copy)
