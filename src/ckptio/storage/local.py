"""Local-disk file writing: large sequential writes, one fsync per file.

Measured on the 2-core reference machine (benchmarks/, README "Performance"): starting the
disk's writeback of each 64 MiB piece as soon as it is in the page cache
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``, Linux) overlaps copying with writing, where a
plain write-then-fsync first fills the cache and only then starts the disk. Chunks below
1 MiB (biases, norms, the header) are gathered and written with one ``writev`` instead of
one system call each. Hashing (xxh3-128, ~15 GB/s, releases the GIL) stays inline.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterable
from pathlib import Path

from ckptio.errors import CheckpointWriteError
from ckptio.storage.base import (
    FileRecord,
    FileWriter,
    HashingStream,
    PositionalFile,
    Reusable,
    WritesAbandoned,
    check_abandoned,
    new_hasher,
)
from ckptio.storage.reuse import link_file

_PIECE = 64 * 1024 * 1024
_SMALL = 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2
_IOV_MAX = 512
_READ_BACK = 16 * 1024 * 1024

try:
    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except (AttributeError, OSError):  # not Linux
    _sync_file_range = None


class _Sink:
    """Writes one open file: gathers small chunks, writes big ones in pieces, starts writeback early."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.hasher = new_hasher()
        self.size = 0
        self._pending: list[memoryview] = []
        self._pending_bytes = 0
        self._kicked = 0

    def add(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        if len(view) < _SMALL:
            self._pending.append(view)
            self._pending_bytes += len(view)
            if self._pending_bytes >= _SMALL or len(self._pending) >= _IOV_MAX:
                self._flush_pending()
            return
        self._flush_pending()
        for start in range(0, len(view), _PIECE):
            piece = view[start : start + _PIECE]
            self.hasher.update(piece)
            self._write_all([piece])

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        for view in self._pending:
            self.hasher.update(view)
        self._write_all(self._pending)
        self._pending, self._pending_bytes = [], 0

    def _write_all(self, views: list[memoryview]) -> None:
        check_abandoned()
        views = [v for v in views if len(v)]
        while views:
            n = os.writev(self.fd, views) if len(views) > 1 else os.write(self.fd, views[0])
            self.size += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
        if _sync_file_range is not None and self.size - self._kicked >= _PIECE:
            _sync_file_range(self.fd, self._kicked, self.size - self._kicked, _SYNC_FILE_RANGE_WRITE)
            self._kicked = self.size

    def finish(self) -> None:
        self._flush_pending()
        os.fsync(self.fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_error(exc: OSError, path: str) -> CheckpointWriteError:
    hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
    return CheckpointWriteError(f"write failed{hint}: {exc.strerror or exc}", path=path)


class _StreamHandle:
    def __init__(self) -> None:
        self.record: FileRecord | None = None


class _LocalPositionalFile(PositionalFile):
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        try:
            self.fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise _write_error(exc, self.path) from exc

    def write_at(self, offset: int, views: list[memoryview]) -> None:
        views = [memoryview(v).cast("B") for v in views if len(v)]
        try:
            for start in range(0, len(views), _IOV_MAX):
                batch = views[start : start + _IOV_MAX]
                end = offset + sum(len(v) for v in batch)
                _pwrite_all(self.fd, batch, offset)
                if _sync_file_range is not None and end - offset >= _PIECE:
                    _sync_file_range(self.fd, offset, end - offset, _SYNC_FILE_RANGE_WRITE)
                offset = end
        except OSError as exc:
            raise _write_error(exc, self.path) from exc

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise _write_error(exc, self.path) from exc
        finally:
            os.close(self.fd)


def _pwrite_all(fd: int, views: list[memoryview], offset: int) -> None:
    """``pwritev`` until every byte is written (the kernel may write less than asked)."""
    while views:
        n = os.pwritev(fd, views, offset)
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


class LocalFileWriter(FileWriter):
    """Writes into an existing local folder (a staging folder that nobody reads yet)."""

    positional = True

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def create(self, name: str, size: int, head: bytes) -> None:
        path = self.root / name
        fd = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
            _pwrite_all(fd, [memoryview(head)], 0)
            os.ftruncate(fd, size)
        except OSError as exc:
            raise _write_error(exc, str(path)) from exc
        finally:
            if fd is not None:
                os.close(fd)

    def open_at(self, name: str) -> PositionalFile:
        return _LocalPositionalFile(self.root / name)

    def record_of(self, name: str) -> FileRecord:
        path = self.root / name
        hasher, size = new_hasher(), 0
        buf = bytearray(_READ_BACK)
        view = memoryview(buf)
        try:
            with open(path, "rb", buffering=0) as fh:
                os.fsync(fh.fileno())
                while n := fh.readinto(view):
                    hasher.update(view[:n])
                    size += n
        except OSError as exc:
            raise _write_error(exc, str(path)) from exc
        return FileRecord(name, size, hasher.hexdigest())

    def link(self, name: str, source: Reusable) -> FileRecord | None:
        return source.record(name) if link_file(source, self.root / name) else None

    def _open(self, name: str):
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "wb", buffering=0), str(path)

    def write(self, name: str, chunks: Iterable[bytes | memoryview]) -> FileRecord:
        path = self.root / name
        fd = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
            sink = _Sink(fd)
            for chunk in chunks:
                sink.add(chunk)
            sink.finish()
        except WritesAbandoned:
            raise
        except OSError as exc:
            raise _write_error(exc, str(path)) from exc
        finally:
            if fd is not None:
                os.close(fd)
        return FileRecord(name, sink.size, sink.hasher.hexdigest())

    @contextlib.contextmanager
    def open_stream(self, name: str):
        handle = _StreamHandle()
        raw, path = None, str(self.root / name)
        try:
            raw, path = self._open(name)
            stream = HashingStream(raw)
            stream.handle = handle
            yield stream
            os.fsync(raw.fileno())
            handle.record = FileRecord(name, stream.size, stream.hexdigest())
            stream.record = handle.record
        except WritesAbandoned:
            raise
        except OSError as exc:
            raise _write_error(exc, path) from exc
        finally:
            if raw is not None:
                raw.close()
