"""Rotation and resume for training loops, on top of ``save_checkpoint`` / ``load_checkpoint``.

A training loop wants three things from its checkpoints: save every so often, keep a few,
and after any crash pick up from the newest one that is really complete. The safety comes
from the order of operations: an old checkpoint is deleted only after a newer one has been
committed (for an async save, only once it is durable), so at every moment at least one
complete checkpoint exists. ``latest()`` never trusts a folder by its name alone: it needs
``running_states.json`` and, when the folder has a manifest, every listed file at its
recorded size.

A manager only replaces or deletes checkpoints of its own run: the ones it wrote, and the
ones it found when :meth:`CheckpointManager.resume` succeeded (the run it continues). A save
into a folder that holds other checkpoints is refused unless ``discard_existing=True``, so a
fresh start, or a resume that silently fell through, never overwrites another run.
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
from ckptio.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    DistributedCheckpointError,
    StateMismatchError,
)
from ckptio.formats.naming import OLD_MARK, TMP_MARK, parse_foreign_checkpoint_name
from ckptio.storage import atomic
from ckptio.storage.location import is_url, local_path
from ckptio.storage.manifest import read_manifest
from ckptio.storage.verify import check_against_manifest
from ckptio.training.checkpoint import (
    RUNNING_STATES,
    checkpoint_name,
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

    Args:
        save_dir: the run's folder (local or mounted); checkpoints are ``epoch-E_step-S`` in it.
        booster: the Booster whose CheckpointIO saves and loads.
        keep_last: how many of the newest checkpoints rotation keeps (``None`` keeps all).
        keep_every: checkpoints whose ``step`` is a multiple of it are never rotated away.
        save_every: :meth:`save` writes only when ``step`` is a multiple of it (``force=True``
            overrides), so the loop can call it every step.
        coordinator: the ranks that save together (default: a ``DistCoordinator`` of the
            default group).
        discard_existing: whether this run may replace the checkpoints already in ``save_dir``
            that it did not resume from. By default :meth:`save` refuses
            (``CheckpointExistsError``) while the folder holds any; with ``True`` a same-named
            save replaces one and the rest are deleted once this run's first checkpoint is
            committed, so ``latest()`` never mixes two runs.

    Every rank calls every method; the master decides (what is whose, what to delete) and only
    the master deletes. Local paths only: object-store URLs work with
    :func:`ckptio.training.save_checkpoint` directly, without rotation.
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
        discard_existing: bool = False,
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
        self.discard_existing = bool(discard_existing)
        self._rotation_pending = False
        self._ours: set[str] = set()  # names of this run's checkpoints: written, or found by a successful resume
        self._to_discard: set[str] = set()  # another run's, deleted at the next rotation (discard_existing=True)
        self._last_saved: str | None = None  # never rotated away, whatever sorts after it

    # ------------------------------------------------------------------ saving
    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` at ``step`` writes (``save_every`` divides it, or no ``save_every``).

        Args:
            step: the step the loop is at.
        """
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
        ``use_safetensors``, ``use_async``, ``extra_states``, ``stateful``, ``only_trainable``,
        ``reuse_unchanged``): by default the frozen parameters' files are hard-linked from the
        previous checkpoint while their bytes stay the same, and rotating that one away later
        leaves them to the checkpoints that link them. With ``use_async=True`` the old
        checkpoints are deleted once the new one is durable: at the next ``save`` or ``wait``,
        never before. A step this run already saved (or resumed from) is replaced atomically.
        Raises ``CheckpointExistsError`` on every rank, writing nothing, while ``save_dir`` holds
        checkpoints that are not this run's (see ``discard_existing``).

        Args:
            model: the boosted model.
            optimizer: its optimizer (or None).
            lr_scheduler: its scheduler (or None).
            epoch: the epoch the loop is in.
            step: the step within the epoch (``sample_start_index = step * batch_size``).
            batch_size: the batch size per rank.
            force: save even when ``save_every`` does not divide ``step``.
            kwargs: passed to :func:`ckptio.training.save_checkpoint`.
        """
        if not force and not self.should_save(step):
            return None
        self.wait()  # the previous (async) save is durable and rotated before the next one starts
        others = collective_step(
            self._group,
            f"preparing {self.save_dir} for a save",
            lambda: self._prepare_folder() if self._group.rank == 0 else None,
            gather=True,
        )[0]  # the master's view, the same decision on every rank
        if others and not self.discard_existing:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise CheckpointExistsError(
                f"holds {len(others)} checkpoint(s) that this CheckpointManager neither wrote nor resumed from "
                f"({shown}); saving here would replace or rotate them away, so nothing was saved. To continue "
                "that run, call manager.resume(...) before saving; to keep it, use another save_dir; to start "
                "over here, pass discard_existing=True to CheckpointManager (they are then deleted once this "
                "run's first checkpoint is committed)",
                path=self.save_dir,
            )
        self._to_discard.update(others)
        path = save_checkpoint(
            self.save_dir, self.booster, model, optimizer, lr_scheduler, epoch, step, batch_size, self.coordinator,
            **kwargs,
        )  # fmt: skip
        name = checkpoint_name(epoch, step)
        self._ours.add(name)
        self._to_discard.discard(name)
        self._last_saved = name
        self._rotation_pending = True
        if not kwargs.get("use_async"):
            self._rotate()
        return path

    def _prepare_folder(self) -> list[str]:
        """On the master: clear what crashes left, and name the checkpoints that are not this run's.

        A checkpoint is a folder with its name and ``running_states.json`` (a commit always has
        one, damaged or not); a bare folder with the name is nobody's run and blocks nothing.
        """
        self._remove_leftovers()
        return [
            e.path.name
            for e in sorted(self._entries())
            if e.path.name not in self._ours and (e.path / RUNNING_STATES).is_file()
        ]

    def wait(self) -> None:
        """Block until an async save is durable (its error re-raised here), then rotate."""
        self.booster.wait()
        if self._rotation_pending:
            self._rotate()

    def _rotate(self) -> None:
        self._rotation_pending = False
        if self._group.rank == 0:
            for entry in self._doomed():
                # renamed aside with a mark recovery never restores, then deleted: a crash mid-delete
                # leaves a hidden folder the next save removes, never a half checkpoint under its name
                try:
                    atomic.delete_folder(entry.path)
                except OSError:
                    continue
                self._ours.discard(entry.path.name)
                self._to_discard.discard(entry.path.name)
        self._group.barrier()

    def _doomed(self) -> list[_Entry]:
        """What rotation deletes: another run's checkpoints the user chose to discard, and this run's
        beyond the newest ``keep_last`` complete ones (the one just saved always counts among them).

        Counting only complete ones keeps a resumed run safe: a damaged checkpoint newer than the
        one it resumed from (a step it will redo) neither pushes the new checkpoints out nor is
        deleted; damaged ones older than the kept window go. ``keep_every`` ones always stay.
        """
        doomed, kept = [], 0
        for entry in sorted(self._entries(), reverse=True):
            name = entry.path.name
            if name in self._to_discard:
                doomed.append(entry)
            elif name not in self._ours or self.keep_last is None:
                continue  # not ours (it appeared since the save began), or no rotation
            elif name == self._last_saved:
                kept += 1
            elif kept < self.keep_last:
                kept += self._problem(entry.path) is None
            elif self.keep_every is None or entry.step % self.keep_every != 0:
                doomed.append(entry)
        return doomed

    def _remove_leftovers(self) -> None:
        """Drop staging folders of saves that crashed and folders a crash left half-deleted, and
        put back any checkpoint a crash left aside mid-swap."""
        if not self.save_dir.is_dir():
            return
        atomic.remove_deleted(self.save_dir)
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
        ``verify``, ``restore_rng``, and ``stateful``: the objects saved with
        ``save(..., stateful=...)``). A damaged checkpoint (a missing or truncated file, a bad
        checksum with ``verify=True``, a file that does not parse) is skipped with a warning for
        the next older one; :func:`load_checkpoint` checks every part before it changes anything,
        on every rank with one verdict, so every rank skips the same ones and nothing of a skipped
        one was loaded. A checkpoint that does not fit the live objects (``StateMismatchError``:
        the job's config or code changed) raises, on every rank: an older one of the same run
        would not fit either, and starting over would overwrite the run's checkpoints. After a
        successful resume the checkpoints found here are this run's (saves may replace and
        rotate them); after None, :meth:`save` refuses while any are left (``discard_existing``).

        When ``save_dir`` holds no ckptio checkpoint that loads, the checkpoints other tools left
        there are tried, newest (highest number) first: a ``transformers.Trainer`` output folder's
        ``checkpoint-N/``, accelerate's automatic ``checkpoint_N/`` (pass its ``checkpoints``
        folder). A run moves over with its first resume; its next saves are ckptio's, in the same
        folder, and the other tool's folders are never replaced or deleted.

        Args:
            model: the boosted model to load into.
            optimizer: its optimizer (or None).
            lr_scheduler: its scheduler (or None).
            kwargs: passed to :func:`ckptio.training.load_checkpoint`.
        """
        newest_first = collective_step(
            self._group,
            f"listing the checkpoints in {self.save_dir}",
            lambda: self._list_for_resume() if self._group.rank == 0 else None,
            gather=True,
        )[0]
        checksums = bool(kwargs.get("verify"))
        for name in newest_first:
            path = Path(name)
            foreign = parse_foreign_checkpoint_name(path.name) is not None
            try:
                if not foreign:  # another tool's folder has no running_states.json: load_checkpoint checks it
                    collective_step(
                        self._group, f"checking {path}", lambda path=path: self._check(path, checksums=checksums)
                    )
            except (CheckpointError, OSError) as exc:
                warnings.warn(f"skipping incomplete or damaged checkpoint {path}: {exc}", stacklevel=2)
                continue
            try:
                where = load_checkpoint(path, self.booster, model, optimizer, lr_scheduler, **kwargs)
            except StateMismatchError as exc:
                raise StateMismatchError(
                    "does not fit this job (did its config or code change?), and older checkpoints of the run would "
                    "not either, so resume() does not fall back to a fresh start. Resume with the job that wrote it, "
                    f"or start afresh in another save_dir (or with discard_existing=True). {exc}",
                    path=path,
                    report=exc.report,
                ) from exc
            except DistributedCheckpointError:
                raise  # lost contact, or a failure while loading after every check passed: ranks may differ
            except CheckpointError as exc:  # damage found by the checks: nothing was loaded, on any rank
                warnings.warn(f"skipping incomplete or damaged checkpoint {path}: {exc}", stacklevel=2)
                continue
            self._ours.update(Path(n).name for n in newest_first if parse_foreign_checkpoint_name(Path(n).name) is None)
            return where
        return None

    def _list_for_resume(self) -> list[str]:
        """ckptio's checkpoints, then other tools' (see :meth:`resume`), each newest first."""
        self._remove_leftovers()  # a checkpoint left renamed aside by a crash is put back first
        ours = [str(e.path) for e in sorted(self._entries(), reverse=True)]
        foreign = sorted(
            (p for p in self.save_dir.iterdir() if p.is_dir() and parse_foreign_checkpoint_name(p.name) is not None),
            key=lambda p: parse_foreign_checkpoint_name(p.name),
            reverse=True,
        ) if self.save_dir.is_dir() else []  # fmt: skip
        return ours + [str(p) for p in foreign]
