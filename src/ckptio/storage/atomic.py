"""The commit protocol: a checkpoint appears whole, or not at all.

Folders are written under a hidden staging sibling (``.NAME.ckptio-tmp-TOKEN``), every
file fsync'd, the manifest written last, the folder fsync'd, and then swapped into place.
On Linux the swap is one ``renameat2(RENAME_EXCHANGE)``: there is never a moment without a
checkpoint at the target path. Elsewhere the old folder is first renamed aside
(``.NAME.ckptio-old-TOKEN``) and restored by :func:`recover` if a crash hits between the two
renames. Files in the old folder that this save does not own (another prefix's shards, a
user's notes) are hard-linked into the new folder before the swap, so they survive.

A checkpoint that is deleted on purpose (rotation) is first renamed to
``.NAME.ckptio-del-TOKEN``, a mark :func:`recover` never restores: a crash mid-delete leaves
a hidden folder that no reader looks at and the next save removes, never a half-deleted
checkpoint under its real name.

Single files are written to a hidden sibling and renamed over the target (atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ckptio.errors import CheckpointWriteError
from ckptio.formats.naming import COMMIT_MARKER, DELETE_MARK, MANIFEST, OLD_MARK, REMOTE_VERSION_PREFIX, TMP_MARK
from ckptio.storage.base import Commit, FileRecord, ReuseIndex
from ckptio.storage.local import LocalFileWriter, fsync_dir
from ckptio.storage.manifest import Manifest, read_manifest
from ckptio.storage.reuse import index_folders

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):
    _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the OS or filesystem cannot."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def new_token() -> str:
    return secrets.token_hex(6)


def staging_path(target: Path, token: str) -> Path:
    return target.parent / f".{target.name}{TMP_MARK}{token}"


def _siblings(target: Path, mark: str) -> list[Path]:
    pattern = re.compile(rf"^\.{re.escape(target.name)}{re.escape(mark)}[0-9a-f]+$")
    if not target.parent.is_dir():
        return []
    return [p for p in target.parent.iterdir() if pattern.match(p.name)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover(target: str | os.PathLike) -> None:
    """Put back a checkpoint that a crash left renamed aside, and drop finished leftovers.

    Safe to call before every save and load: when ``target`` exists, old copies are garbage;
    when it does not, the newest old copy is the last committed checkpoint.
    """
    target = Path(target)
    olds = sorted(_siblings(target, OLD_MARK), key=lambda p: p.stat().st_mtime)
    if not target.exists() and olds:
        os.rename(olds.pop(), target)
        fsync_dir(target.parent)
    for old in olds:
        _remove(old)


def delete_folder(path: str | os.PathLike) -> None:
    """Delete a committed checkpoint folder so that a crash at any moment leaves either the
    whole folder under its name or nothing under it: renamed aside with a mark that recovery
    never restores (durably), then removed."""
    path = Path(path)
    doomed = path.parent / f".{path.name}{DELETE_MARK}{new_token()}"
    os.rename(path, doomed)
    fsync_dir(path.parent)
    _remove(doomed)


def remove_deleted(folder: str | os.PathLike) -> list[Path]:
    """Finish deletions a crash interrupted: every ``.NAME.ckptio-del-TOKEN`` directly in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"^\..+{re.escape(DELETE_MARK)}[0-9a-f]+$")
    removed = [p for p in folder.iterdir() if pattern.match(p.name)]
    for path in removed:
        _remove(path)
    return removed


def clean_stale_staging(target: str | os.PathLike, keep: str | None = None) -> list[Path]:
    """Remove staging folders left by saves that crashed (never loaded, never committed), and
    what a crash left of a deletion of ``target``."""
    removed = []
    for path in _siblings(Path(target), DELETE_MARK):
        _remove(path)
        removed.append(path)
    for path in _siblings(Path(target), TMP_MARK):
        if keep is None or not path.name.endswith(keep):
            _remove(path)
            removed.append(path)
    return removed


class FolderCommit(Commit):
    """One save of a checkpoint folder: stage, then :meth:`commit` or :meth:`abort`.

    ``owns(name)`` says which top-level entries of an existing folder this save replaces;
    the rest are carried over. In a multi-rank save every rank builds a ``FolderCommit``
    with the same ``token`` (chosen by the master); only the master calls ``begin`` and
    ``commit``, after the others' files are written.
    """

    def __init__(
        self,
        target: str | os.PathLike,
        *,
        owns: Callable[[str], bool] = lambda name: True,
        token: str | None = None,
    ) -> None:
        self.target = Path(os.path.abspath(target))
        self.owns = owns
        self.token = token or new_token()
        self.staging = staging_path(self.target, self.token)
        self.writer = LocalFileWriter(self.staging)
        self.file_name = None

    def begin(self) -> FolderCommit:
        if self.target.exists() and not self.target.is_dir():
            raise CheckpointWriteError("exists and is not a folder; refusing to replace a file", path=self.target)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            recover(self.target)
            clean_stale_staging(self.target)
            self.staging.mkdir()
        except OSError as exc:
            raise CheckpointWriteError(f"cannot create staging folder: {exc}", path=self.staging) from exc
        return self

    def abort(self) -> None:
        _remove(self.staging)

    def reuse_index(self, references: Iterable[str] = ()) -> ReuseIndex | None:
        """The files of the folder this save replaces and of the committed ``references`` (e.g.
        the run's previous checkpoint), by content (:mod:`ckptio.storage.reuse`)."""
        folders = dict.fromkeys([self.target, *(Path(os.path.abspath(r)) for r in references)])
        return index_folders(f for f in folders if f != self.staging)

    def _carry_over(self, old: Manifest | None) -> dict[str, FileRecord]:
        """Hard-link what the old folder holds that this save does not own."""
        carried: dict[str, FileRecord] = {}
        if not self.target.is_dir():
            return carried
        for entry in self.target.iterdir():
            name = entry.name
            if name == MANIFEST or self.owns(name) or (self.staging / name).exists() or _synced_commit(name):
                continue
            dest = self.staging / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(entry, dest)
            if old is not None:
                for rel, rec in old.files.items():
                    if rel == name or rel.startswith(name + "/"):
                        carried[rel] = rec
        return carried

    def commit(self, records: Iterable[FileRecord], manifest_extra: dict[str, Any] | None = None) -> Path:
        """Write the manifest, make everything durable, and swap the folder into place."""
        try:
            old = None
            with contextlib.suppress(Exception):
                old = read_manifest(self.target) if self.target.is_dir() else None
            files = self._carry_over(old)
            files.update({rec.name: rec for rec in records})
            manifest = Manifest(files, dict(manifest_extra or {}))
            self.writer.write(MANIFEST, [manifest.to_bytes()])
            for folder in sorted({(self.staging / n).parent for n in files}, key=lambda p: -len(p.parts)):
                if folder.is_dir():
                    fsync_dir(folder)
            fsync_dir(self.staging)
            self._swap()
        except OSError as exc:
            self.abort()
            raise CheckpointWriteError(f"commit failed: {exc}", path=self.target) from exc
        return self.target

    def _swap(self) -> None:
        swap_into_place(self.staging, self.target, self.token)


def swap_into_place(staged: Path, target: Path, token: str) -> None:
    """Put the complete, durable folder ``staged`` at ``target``, replacing what is there (a
    folder, or a file), so that a crash at any moment leaves the old or the new one at ``target``
    (after :func:`recover` where the OS cannot exchange two paths); the old one is then removed."""
    if not target.exists():
        os.rename(staged, target)
        fsync_dir(target.parent)
        return
    if _exchange(staged, target):
        fsync_dir(target.parent)
        _remove(staged)  # now holds the previous checkpoint
        return
    aside = target.parent / f".{target.name}{OLD_MARK}{token}"
    os.rename(target, aside)
    try:
        os.rename(staged, target)
    except OSError:
        os.rename(aside, target)
        raise
    fsync_dir(target.parent)
    _remove(aside)


def _synced_commit(name: str) -> bool:
    """The marker and versions of an object-store checkpoint synced down to this folder: a local
    save replaces them (kept, the marker would still name the old version to every reader)."""
    return name == COMMIT_MARKER or name.startswith(REMOTE_VERSION_PREFIX)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class FileCommit(Commit):
    """One save of a single file: written to a hidden sibling, renamed over the target."""

    def __init__(self, target: str | os.PathLike, *, token: str | None = None) -> None:
        self.target = Path(os.path.abspath(target))
        self.token = token or new_token()
        self.staging = staging_path(self.target, self.token)
        self.writer = LocalFileWriter(self.staging.parent)
        self.file_name = self.staging.name

    def begin(self) -> FileCommit:
        if self.target.is_dir():
            raise CheckpointWriteError("is a folder; pass a file path for shard=False", path=self.target)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointWriteError(f"cannot create parent folder: {exc}", path=self.target) from exc
        clean_stale_staging(self.target)
        return self

    @property
    def staging_name(self) -> str:
        return self.staging.name

    def abort(self) -> None:
        _remove(self.staging)

    def commit(self, records=None, manifest_extra=None) -> Path:
        """Rename the staged file over the target (``records``: the file's record, unused: a
        single file carries no manifest)."""
        try:
            os.replace(self.staging, self.target)
            fsync_dir(self.target.parent)
        except OSError as exc:
            self.abort()
            raise CheckpointWriteError(f"commit failed: {exc}", path=self.target) from exc
        return self.target


@contextlib.contextmanager
def aborting_on_error(commit: FolderCommit | FileCommit):
    """Remove the staging area if anything inside the block fails, then re-raise."""
    try:
        yield commit
    except BaseException:
        commit.abort()
        raise
