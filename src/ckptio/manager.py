"""Rotation and resume for training loops, on top of ``save_checkpoint`` / ``load_checkpoint``.

A training loop wants three things from its checkpoints: save every so often, keep a few,
and after any crash pick up from the newest one that is really complete. The safety comes
from the order of operations: an old checkpoint is deleted only after a newer one has been
committed (for an async save, only once it is durable), so at every moment at least one
complete checkpoint exists. ``latest()`` never trusts a folder by its name alone: it needs
``running_states.json`` and, when the folder has a manifest, every listed file at its
recorded size.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ckptio.cluster import DistCoordinator
from ckptio.engine.group import Group, collective_step
from ckptio.errors import CheckpointError, CheckpointFormatError
from ckptio.formats.naming import OLD_MARK, TMP_MARK
from ckptio.storage import atomic
from ckptio.storage.location import is_url, local_path
from ckptio.storage.manifest import read_manifest
from ckptio.storage.verify import check_against_manifest
from ckptio.training.checkpoint import (
    RUNNING_STATES,
    load_checkpoint,
    load_json,
    parse_checkpoint_name,
    save_checkpoint,
)

_LEFTOVER_RE = re.compile(rf"^\.epoch-\d+_step-\d+(?:{re.escape(TMP_MARK)}|{re.escape(OLD_MARK)})[0-9a-f]+$")


@dataclass(frozen=True, order=True)
class _Entry:
    epoch: int
    step: int
    path: Path


def _positive_or_none(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


class CheckpointManager:
    """Saves training checkpoints under ``save_dir``, keeps the newest few, resumes from the newest good one.

    ``keep_last``: how many of the newest checkpoints rotation keeps (``None`` keeps all).
    ``keep_every``: checkpoints whose ``step`` is a multiple of it are never rotated away.
    ``save_every``: :meth:`save` writes only when ``step`` is a multiple of it (``force=True``
    overrides), so the loop can call it every step.

    Every rank calls every method; only the master deletes. Local paths only: object-store
    URLs work with :func:`ckptio.training.save_checkpoint` directly, without rotation.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        booster: Any,
        keep_last: int | None = 3,
        *,
        keep_every: int | None = None,
        save_every: int | None = None,
        coordinator: DistCoordinator | None = None,
    ) -> None:
        save_dir = local_path(save_dir)  # file:///x is the local /x
        if is_url(save_dir):
            raise ValueError(
                f"CheckpointManager needs a local or mounted folder, got {os.fspath(save_dir)!r}; "
                "use ckptio.training.save_checkpoint/load_checkpoint with URLs"
            )
        self.save_dir = Path(save_dir)
        self.booster = booster
        self.keep_last = _positive_or_none("keep_last", keep_last)
        self.keep_every = _positive_or_none("keep_every", keep_every)
        self.save_every = _positive_or_none("save_every", save_every)
        self.coordinator = coordinator or DistCoordinator()
        self._group = Group(getattr(self.coordinator, "group", None))
        self._rotation_pending = False

    # ------------------------------------------------------------------ saving
    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` at ``step`` writes (``save_every`` divides it, or no ``save_every``)."""
        return self.save_every is None or step % self.save_every == 0

    def save(
        self,
        model: nn.Module,
        optimizer: Any,
        lr_scheduler: Any,
        epoch: int,
        step: int,
        batch_size: int,
        *,
        force: bool = False,
        **kwargs: Any,
    ) -> Path | None:
        """Save ``epoch-E_step-S`` and rotate; returns its path, or None when ``save_every`` skips it.

        ``kwargs`` go to :func:`ckptio.training.save_checkpoint` (``sampler``, ``size_per_shard``,
        ``use_safetensors``, ``use_async``, ``extra_states``). With ``use_async=True`` the old
        checkpoints are deleted once the new one is durable: at the next ``save`` or ``wait``,
        never before.
        """
        if not force and not self.should_save(step):
            return None
        self.wait()  # the previous (async) save is durable and rotated before the next one starts
        if self._group.rank == 0:
            self._remove_leftovers()
        self._group.barrier()
        path = save_checkpoint(
            self.save_dir, self.booster, model, optimizer, lr_scheduler, epoch, step, batch_size, self.coordinator,
            **kwargs,
        )  # fmt: skip
        self._rotation_pending = True
        if not kwargs.get("use_async"):
            self._rotate()
        return path

    def wait(self) -> None:
        """Block until an async save is durable (its error re-raised here), then rotate."""
        self.booster.wait()
        if self._rotation_pending:
            self._rotate()

    def _rotate(self) -> None:
        self._rotation_pending = False
        if self._group.rank == 0 and self.keep_last is not None:
            entries = sorted(self._entries(), reverse=True)
            for entry in entries[self.keep_last :]:
                if self.keep_every is not None and entry.step % self.keep_every == 0:
                    continue
                # rename first (atomic), then delete: a crash mid-delete never leaves a half folder under a real name
                doomed = entry.path.parent / f".{entry.path.name}{OLD_MARK}{atomic.new_token()}"
                try:
                    os.rename(entry.path, doomed)
                except OSError:
                    continue
                shutil.rmtree(doomed, ignore_errors=True)
        self._group.barrier()

    def _remove_leftovers(self) -> None:
        """Drop staging folders of saves that crashed, and put back any checkpoint a crash left aside."""
        if not self.save_dir.is_dir():
            return
        for entry in self.save_dir.iterdir():
            if _LEFTOVER_RE.match(entry.name):
                name = entry.name[1:].split(TMP_MARK)[0].split(OLD_MARK)[0]
                atomic.recover(self.save_dir / name)
        for entry in self.save_dir.iterdir():
            if _LEFTOVER_RE.match(entry.name) and TMP_MARK in entry.name:
                shutil.rmtree(entry, ignore_errors=True)

    # ------------------------------------------------------------------ finding and resuming
    def _entries(self) -> list[_Entry]:
        if not self.save_dir.is_dir():
            return []
        out = []
        for path in self.save_dir.iterdir():
            parsed = parse_checkpoint_name(path.name)
            if parsed is not None and path.is_dir():
                out.append(_Entry(*parsed, path))
        return out

    def checkpoints(self) -> list[Path]:
        """Every complete-looking checkpoint folder, oldest first (by epoch, then step)."""
        return [e.path for e in sorted(self._entries()) if self._problem(e.path) is None]

    @staticmethod
    def _check(path: Path, *, checksums: bool = False) -> None:
        """Raise ``CheckpointError`` naming the file when ``path`` is not a complete checkpoint:
        ``running_states.json`` readable with epoch and step, every manifest file at its size
        (and, with ``checksums``, with its bytes)."""
        running = load_json(path / RUNNING_STATES)
        if not all(k in running for k in ("epoch", "step")):
            raise CheckpointFormatError("lacks epoch/step", path=path / RUNNING_STATES)
        manifest = read_manifest(path)
        if manifest is not None:
            check_against_manifest(path, list(manifest.files), checksums=checksums)

    @classmethod
    def _problem(cls, path: Path) -> str | None:
        """Why ``path`` is not a complete checkpoint, or None when it is (sizes only, no re-hashing)."""
        try:
            cls._check(path)
        except CheckpointError as exc:
            return str(exc)
        except OSError as exc:
            return f"{path}: {exc}"
        return None

    def latest(self) -> Path | None:
        """The newest complete, valid checkpoint (by epoch, then step), or None.

        A newer folder that fails the checks (a missing or truncated file) is skipped with a
        warning; temporaries of interrupted saves are never considered. Read-only: an async
        save still in flight is not there yet.
        """
        for entry in sorted(self._entries(), reverse=True):
            problem = self._problem(entry.path)
            if problem is None:
                return entry.path
            warnings.warn(f"skipping incomplete or damaged checkpoint {entry.path}: {problem}", stacklevel=2)
        return None

    def resume(self, model: nn.Module, optimizer: Any, lr_scheduler: Any, **kwargs: Any) -> tuple[int, int, int] | None:
        """Load the newest good checkpoint; ``(epoch, step, sample_start_index)``, or None if there is none.

        ``kwargs`` go to :func:`ckptio.training.load_checkpoint` (``sampler``, ``strict``,
        ``verify``, ``restore_rng``). A checkpoint whose files are incomplete or (with
        ``verify=True``) corrupt is skipped with a warning for the next older one; on several
        ranks that check is one collective step, so every rank skips the same ones. In one
        process, a checkpoint that then fails to load is skipped too (the older one's load
        overwrites whatever the failed attempt touched); on several ranks that raises, since
        the ranks might have failed at different points.
        """
        if self._group.rank == 0:
            self._remove_leftovers()  # a checkpoint left renamed aside by a crash is put back first
        newest_first = [str(e.path) for e in sorted(self._entries(), reverse=True)] if self._group.rank == 0 else None
        candidates = self._group.broadcast_object(newest_first, what="agreeing on the checkpoints to resume from")
        checksums = bool(kwargs.get("verify"))
        for name in candidates:
            path = Path(name)
            try:
                collective_step(
                    self._group, f"checking {path}", lambda path=path: self._check(path, checksums=checksums)
                )
            except (CheckpointError, OSError) as exc:
                warnings.warn(f"skipping incomplete or damaged checkpoint {path}: {exc}", stacklevel=2)
                continue
            if self._group.size > 1:
                return load_checkpoint(path, self.booster, model, optimizer, lr_scheduler, **kwargs)
            try:
                return load_checkpoint(path, self.booster, model, optimizer, lr_scheduler, **kwargs)
            except CheckpointError as exc:
                warnings.warn(f"could not load {path}, trying an older checkpoint: {exc}", stacklevel=2)
        return None
