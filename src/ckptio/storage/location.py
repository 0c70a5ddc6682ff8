"""Where a checkpoint lives, decided once: a local path or an fsspec URL.

Every save asks :func:`new_commit` for its commit strategy (rename on a filesystem, a commit
marker on an object store) and every load reads through :func:`readable`, so no caller
checks for URLs itself. ``file:///x`` is the local path ``/x``. Local paths never import
fsspec.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ckptio.storage.base import Commit
from ckptio.storage.urls import is_url, join, local_path, url_basename

__all__ = [
    "committed_local",
    "exists",
    "is_url",
    "join",
    "local_path",
    "new_commit",
    "normalize",
    "readable",
    "readable_partially",
    "url_basename",
]


def normalize(checkpoint: str | os.PathLike) -> str:
    """The path as every layer below sees it: a URL unchanged, ``file://`` stripped, a path as text."""
    text = os.fspath(checkpoint)
    return text if is_url(text) else local_path(text)


def new_commit(
    checkpoint: str | os.PathLike, *, folder: bool, token: str, owns: Callable[[str], bool] | None = None
) -> Commit:
    """The commit of one save to ``checkpoint``: the same ``token`` on every rank gives the
    same staging place. ``owns`` says which entries of an existing local folder the save
    replaces (the rest are carried over)."""
    target = normalize(checkpoint)
    if is_url(target):
        from ckptio.storage import fsspec_storage

        cls = fsspec_storage.RemoteFolderCommit if folder else fsspec_storage.RemoteFileCommit
        return cls(target, token=token)
    from ckptio.storage import atomic

    if not folder:
        return atomic.FileCommit(target, token=token)
    return atomic.FolderCommit(target, token=token, **({"owns": owns} if owns is not None else {}))


@contextlib.contextmanager
def readable(checkpoint: str | os.PathLike, *, quiet: bool = False, ranged: bool = False) -> Iterator[str]:
    """A local path to read ``checkpoint`` from: itself, the version a local folder's commit
    marker names (an object-store checkpoint copied down with ``aws s3 sync`` or the like), or
    a copy of the version a URL's marker names (removed afterwards). ``ranged``: the copy's
    safetensors files are placeholders read from the store by byte ranges (readers that open
    files through :func:`ckptio.storage.reading.open_source`), so each rank of a load fetches
    only its boxes; otherwise everything is downloaded."""
    target = normalize(checkpoint)
    if not is_url(target):
        yield committed_local(target)
        return
    from ckptio.storage import fsspec_storage

    if ranged:
        with fsspec_storage.loading_partially(target, quiet=quiet, ranged=True) as copy:
            yield str(copy.path)
        return
    with fsspec_storage.loading(target, quiet=quiet) as local:
        yield local


@contextlib.contextmanager
def readable_partially(
    checkpoint: str | os.PathLike, *, quiet: bool = False
) -> Iterator[tuple[str, Callable[[Iterable[str | os.PathLike]], None]]]:
    """Like :func:`readable`, for a reader that needs only some files: ``(path, fetch)``, where
    ``fetch(paths)`` must be called with the local paths of the files about to be read. A local
    checkpoint is itself (``fetch`` does nothing); of a URL, only its JSON files are downloaded
    at first, and ``fetch`` downloads the others asked for."""
    target = normalize(checkpoint)
    if not is_url(target):
        yield committed_local(target), lambda paths: None
        return
    from ckptio.storage import fsspec_storage

    with fsspec_storage.loading_partially(target, quiet=quiet) as copy:
        yield str(copy.path), copy.fetch


def committed_local(target: str | os.PathLike) -> str:
    """The local ``target``, or the committed version inside it when it holds a commit marker."""
    from ckptio.storage.marker import committed_folder

    folder = committed_folder(target)
    return os.fspath(target) if folder == Path(target) else os.fspath(folder)


def exists(checkpoint: str | os.PathLike) -> bool:
    """Whether something is at ``checkpoint`` (for a URL: a committed checkpoint or an object)."""
    target = normalize(checkpoint)
    if not is_url(target):
        return os.path.lexists(target)
    from ckptio.storage import fsspec_storage

    return fsspec_storage.exists(target)
