"""Checkpoints on object stores and other fsspec filesystems (``s3://``, ``gs://``, ``memory://``).

Object stores have no atomic rename, so a folder cannot be swapped into place the way
:mod:`ckptio.storage.atomic` does on local disk. The protocol here:

* A folder save writes every file under a fresh sub-prefix ``URL/ckptio-v-TOKEN/`` (the
  ckptio manifest included), and then, LAST, the commit marker ``URL/_CKPTIO_COMMITTED``: a
  small JSON object naming that version. One object PUT is atomic on S3 and its kin, so a
  reader sees either the old marker (old version, intact) or the new one (new version,
  complete). Only after the new marker is in place are older versions deleted.
* A reader resolves the marker first. A folder that holds ``ckptio-v-*`` versions but no
  marker is an interrupted first save: it is refused as incomplete, never loaded.
* A single-file save (``URL`` ending in ``.safetensors``/``.bin``/...) is one object: it
  becomes visible only when the upload completes (S3 multipart uploads are aborted on error).

Guarantee, stated honestly: saves are all-or-nothing for readers that start after the
marker flips; a reader that resolved the previous version may see it deleted under it (it
then fails with a "missing file" error and can retry). One writer per URL at a time.

Saves write straight to the store through :class:`RemoteFolderCommit` /
:class:`RemoteFileCommit` (the same :class:`~ckptio.storage.base.Commit` every save uses;
files are hashed while they upload). Loads download the committed version to a local
temporary copy first (:func:`loading`, in 8 MiB pieces), so the local readers and checks
run unchanged; the temporary folder is ``$CKPTIO_TMPDIR`` or the system default.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptio.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
)
from ckptio.formats.naming import COMMIT_MARKER, MANIFEST, REMOTE_VERSION_PREFIX
from ckptio.progress import Progress
from ckptio.storage import reading, s3_client
from ckptio.storage.base import Commit, FileRecord, FileWriter, HashingStream, check_abandoned, new_hasher
from ckptio.storage.marker import MAX_MARKER_BYTES, incomplete, marker_bytes, parse_marker
from ckptio.storage.urls import is_url, url_basename

_CHUNK = 8 * 1024 * 1024


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """``(fs, path)`` for a URL; options come from ``storage_options`` or fsspec's config/env.
    ``s3://`` goes to obstore when it is installed, else s3fs (:mod:`ckptio.storage.s3_client`)."""
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec is a dependency
        raise CheckpointError("fsspec is needed for URL checkpoints: pip install fsspec", path=url) from exc
    if url.startswith("s3://"):
        fs = s3_client.s3_filesystem(url, storage_options)
        if fs is not None:
            return fs, fs._strip_protocol(url).rstrip("/")
        storage_options = s3_client.without_client(storage_options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise CheckpointError(f"cannot open this URL's filesystem: {exc}", path=url) from exc
    return fs, path.rstrip("/")


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def _discard(fh) -> None:
    """Drop a half-written object: abort the multipart upload where the store has one."""
    with contextlib.suppress(Exception):
        if hasattr(fh, "discard"):
            fh.discard()
    # Not closing an fsspec buffered file means its last block is never sent and never committed.
    with contextlib.suppress(Exception):
        fh.closed = True


class FsspecFileWriter(FileWriter):
    """Writes whole objects under ``root`` of an fsspec filesystem, hashing while uploading."""

    def __init__(self, fs, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def _where(self, name: str) -> str:
        return f"{self.fs.unstrip_protocol(_join(self.root, name))}"

    def _open_object(self, name: str):
        """The store's writable file for ``name`` (buffered; multipart for large objects)."""
        try:
            return self.fs.open(_join(self.root, name), "wb")
        except Exception as exc:
            raise CheckpointWriteError(f"cannot create object: {exc}", path=self._where(name)) from exc

    def write(self, name: str, chunks: Iterable[bytes | memoryview]) -> FileRecord:
        hasher, size = new_hasher(), 0
        fh = self._open_object(name)
        try:
            for chunk in chunks:
                check_abandoned(self._where(name))
                view = memoryview(chunk).cast("B")
                hasher.update(view)
                fh.write(view)
                size += len(view)
        except BaseException as exc:
            _discard(fh)
            if isinstance(exc, Exception) and not isinstance(exc, CheckpointError):
                raise CheckpointWriteError(f"upload failed: {exc}", path=self._where(name)) from exc
            raise
        try:
            fh.close()
        except Exception as exc:
            raise CheckpointWriteError(f"upload failed: {exc}", path=self._where(name)) from exc
        return FileRecord(name, size, hasher.hexdigest())

    @contextlib.contextmanager
    def open_stream(self, name: str):
        fh = self._open_object(name)
        stream = HashingStream(fh)
        try:
            yield stream
        except BaseException as exc:
            _discard(fh)
            if isinstance(exc, Exception) and not isinstance(exc, CheckpointError):
                raise CheckpointWriteError(f"upload failed: {exc}", path=self._where(name)) from exc
            raise
        try:
            fh.close()
        except Exception as exc:
            raise CheckpointWriteError(f"upload failed: {exc}", path=self._where(name)) from exc
        stream.record = FileRecord(name, stream.size, stream.hexdigest())


def read_marker(fs, root: str) -> str | None:
    """The committed version's sub-prefix, or None when there is no marker."""
    marker = _join(root, COMMIT_MARKER)
    try:
        with fs.open(marker, "rb") as fh:
            raw = fh.read(MAX_MARKER_BYTES)
    except FileNotFoundError:
        return None
    return parse_marker(raw, where=fs.unstrip_protocol(marker))


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A resolved URL: one object, or the folder (committed version) to read files from."""

    fs: Any
    url: str
    path: str
    is_file: bool


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> RemoteCheckpoint:
    """Find what ``url`` holds, refusing a folder whose ckptio save never committed."""
    fs, root = filesystem(url, storage_options)
    try:
        if fs.isfile(root):
            return RemoteCheckpoint(fs, url, root, True)
        version = read_marker(fs, root)
        if version is not None:
            return RemoteCheckpoint(fs, url, _join(root, version), False)
        names = [n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False)] if fs.isdir(root) else []
    except CheckpointError:
        raise
    except FileNotFoundError:
        names = []
    except Exception as exc:
        raise CheckpointError(f"cannot list: {exc}", path=url) from exc
    if any(n.startswith(REMOTE_VERSION_PREFIX) for n in names):
        raise incomplete(url)
    if not names:
        raise CheckpointNotFoundError("checkpoint does not exist", path=url)
    # A folder put there by another tool (e.g. a Hugging Face upload): read as it is.
    return RemoteCheckpoint(fs, url, root, False)


def _sources(remote: RemoteCheckpoint, local: Path) -> dict[Path, str]:
    """Every object of a resolved checkpoint: local path -> object path."""
    if remote.is_file:
        return {local: remote.path}
    sources = {}
    for obj in remote.fs.find(remote.path):
        rel = obj[len(remote.path) :].lstrip("/")
        if not rel or rel == COMMIT_MARKER or rel.startswith(REMOTE_VERSION_PREFIX):
            continue
        sources[local / rel] = obj
    return sources


def _download(fs, sources: dict[Path, str], label: str, quiet: bool) -> None:
    sizes = {dst: fs.size(src) or 0 for dst, src in sources.items()}
    with Progress(f"download {label}", sum(sizes.values()), len(sources), quiet=quiet) as bar:
        for dst, src in sources.items():
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                with fs.open(src, "rb") as fh, open(dst, "wb") as out:
                    while data := fh.read(_CHUNK):
                        out.write(data)
                        bar.advance(len(data))
            except FileNotFoundError:
                raise CheckpointNotFoundError(
                    "file vanished while downloading (replaced by a newer save?); retry", path=fs.unstrip_protocol(src)
                ) from None
            bar.file_done()


def fetch(url: str, dest: str | os.PathLike, *, storage_options=None, quiet: bool = False) -> Path:
    """Download the committed checkpoint at ``url`` to ``dest/<basename>``; return that path."""
    remote = resolve(url, storage_options)
    local = Path(dest) / url_basename(url)
    sources = _sources(remote, local)
    if not remote.is_file:
        local.mkdir(parents=True, exist_ok=True)
    _download(remote.fs, sources, url_basename(url), quiet)
    return local


class PartialCopy:
    """A local stand-in for the committed checkpoint at ``url`` that downloads only what is read.

    Its JSON files (indexes, manifest, running states, configs: what says where tensors are)
    are downloaded at once; every other file is an empty placeholder, so names and layouts are
    found as in a full copy, until :meth:`fetch` downloads it. A one-object URL is downloaded.
    """

    def __init__(
        self, url: str, dest: str | os.PathLike, *, storage_options=None, quiet: bool = False, ranged: bool = False
    ) -> None:
        remote = resolve(url, storage_options)
        self.fs, self.url, self.quiet = remote.fs, url, quiet
        self.path = Path(dest) / url_basename(url)
        sources = _sources(remote, self.path)
        if not remote.is_file:
            self.path.mkdir(parents=True, exist_ok=True)
        # ranged: every safetensors file is read from the store by byte ranges (storage/reading.py),
        # everything else (small: indexes, JSON, torch files) is downloaded now
        self._ranged = {dst: src for dst, src in sources.items() if ranged and dst.name.endswith(".safetensors")}
        now = {
            dst: src
            for dst, src in sources.items()
            if dst not in self._ranged and (ranged or remote.is_file or dst.name.endswith(".json"))
        }
        self._pending = {dst: src for dst, src in sources.items() if dst not in now and dst not in self._ranged}
        for dst in (*self._pending, *self._ranged):
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.touch()
        for dst, src in self._ranged.items():
            reading.register(dst, reading.RemoteObject(self.fs, src, int(self.fs.size(src) or 0)))
        _download(self.fs, now, url_basename(url), quiet)

    def close(self) -> None:
        """Forget the placeholders read by byte ranges (the folder is about to be removed)."""
        for dst in self._ranged:
            reading.unregister(dst)

    def fetch(self, paths: Iterable[str | os.PathLike]) -> None:
        """Download the files at these local paths (those not downloaded yet)."""
        wanted = {Path(p) for p in paths}
        todo = {dst: src for dst, src in {**self._pending, **self._ranged}.items() if dst in wanted}
        _download(self.fs, todo, url_basename(self.url), self.quiet)
        for dst in todo:
            self._pending.pop(dst, None)
            if self._ranged.pop(dst, None) is not None:
                reading.unregister(dst)


class RemoteFolderCommit(Commit):
    """A folder save on an object store: files go under ``URL/ckptio-v-TOKEN/`` (every rank
    writes its own, straight to the store), the manifest last, then the marker names the
    version; older versions are deleted only after the marker flipped."""

    def __init__(self, url: str, *, token: str, storage_options=None) -> None:
        self.target = url
        self.fs, self.root = filesystem(url, storage_options)
        self.version = f"{REMOTE_VERSION_PREFIX}{token}"
        self.writer = FsspecFileWriter(self.fs, _join(self.root, self.version))
        self.file_name = None

    def begin(self) -> RemoteFolderCommit:
        try:
            is_object = self.fs.isfile(self.root)
        except Exception as exc:  # noqa: BLE001 (any backend error: say which URL)
            raise CheckpointWriteError(f"cannot reach the store: {exc}", path=self.target) from exc
        if is_object:
            raise CheckpointWriteError("exists and is not a folder; refusing to replace an object", path=self.target)
        return self

    def commit(self, records: Iterable[FileRecord], manifest_extra: dict[str, Any] | None = None) -> None:
        from ckptio.storage.manifest import Manifest

        files = {rec.name: rec for rec in records}
        # The manifest goes after every file it lists, so even the version folder is never half-described.
        self.writer.write(MANIFEST, [Manifest(files, dict(manifest_extra or {})).to_bytes()])
        commit_marker(self.fs, self.root, marker_bytes(self.version, len(files)))
        prune_versions(self.fs, self.root, keep=self.version)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.fs.rm(_join(self.root, self.version), recursive=True)


class RemoteFileCommit(Commit):
    """A one-file save on an object store: one object, visible only once its upload completes
    (a failed multipart upload is aborted), so it needs no marker."""

    def __init__(self, url: str, *, token: str, storage_options=None) -> None:
        self.target = url
        fs, path = filesystem(url, storage_options)
        parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
        self.fs, self.path = fs, path
        self.writer = FsspecFileWriter(fs, parent)
        self.file_name = name

    def begin(self) -> RemoteFileCommit:
        try:
            is_folder = self.fs.isdir(self.path)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointWriteError(f"cannot reach the store: {exc}", path=self.target) from exc
        if is_folder:
            raise CheckpointWriteError("is a folder; pass a file path for shard=False", path=self.target)
        return self

    def commit(self, records=None, manifest_extra=None) -> None:
        """Nothing left to do: the object appeared when its upload completed."""

    def abort(self) -> None:
        """Nothing to drop: a failed upload never becomes an object."""


def commit_marker(fs, root: str, body: bytes) -> None:
    """Write the marker: the one PUT that makes a new version the checkpoint."""
    FsspecFileWriter(fs, root).write(COMMIT_MARKER, [body])


def prune_versions(fs, root: str, *, keep: str) -> list[str]:
    """Delete every version under ``root`` except ``keep`` (old commits, interrupted saves)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in fs.ls(root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(REMOTE_VERSION_PREFIX) and name != keep:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(_join(root, name), recursive=True)
                removed.append(name)
    return removed


def _tmp_root() -> str | None:
    return os.environ.get("CKPTIO_TMPDIR") or None


@contextlib.contextmanager
def loading(url: str, *, storage_options=None, quiet: bool = False) -> Iterator[str]:
    """Yield a local copy of the committed checkpoint at ``url``; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="ckptio-download-", dir=_tmp_root()) as tmp:
        yield str(fetch(url, tmp, storage_options=storage_options, quiet=quiet))


@contextlib.contextmanager
def loading_partially(
    url: str, *, storage_options=None, quiet: bool = False, ranged: bool = False
) -> Iterator[PartialCopy]:
    """Yield a :class:`PartialCopy` of the committed checkpoint at ``url``; removed afterwards.
    ``ranged``: its safetensors files are read from the store by byte ranges, never downloaded."""
    with tempfile.TemporaryDirectory(prefix="ckptio-download-", dir=_tmp_root()) as tmp:
        copy = PartialCopy(url, tmp, storage_options=storage_options, quiet=quiet, ranged=ranged)
        try:
            yield copy
        finally:
            copy.close()


def exists(url: str, storage_options=None) -> bool:
    """Whether ``url`` holds a committed checkpoint (or an object)."""
    try:
        resolve(url, storage_options)
    except CheckpointNotFoundError:
        return False
    return True


__all__ = [
    "FsspecFileWriter",
    "RemoteCheckpoint",
    "commit_marker",
    "exists",
    "RemoteFileCommit",
    "RemoteFolderCommit",
    "fetch",
    "filesystem",
    "is_url",
    "loading",
    "loading_partially",
    "PartialCopy",
    "read_marker",
    "resolve",
]
