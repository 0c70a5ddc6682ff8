"""Local-disk file writing: large sequential writes, one fsync per file."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from pathlib import Path

from ckptio.errors import CheckpointWriteError
from ckptio.storage.base import FileRecord, FileWriter, HashingStream


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


class LocalFileWriter(FileWriter):
    """Writes into an existing local folder (a staging folder that nobody reads yet)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _open(self, name: str):
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "wb", buffering=0), str(path)

    def write(self, name: str, chunks: Iterable[bytes | memoryview]) -> FileRecord:
        raw, path = None, str(self.root / name)
        try:
            raw, path = self._open(name)
            stream = HashingStream(raw)
            for chunk in chunks:
                stream.write(chunk)
            os.fsync(raw.fileno())
        except OSError as exc:
            raise _write_error(exc, path) from exc
        finally:
            if raw is not None:
                raw.close()
        return FileRecord(name, stream.size, stream.hexdigest())

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
        except OSError as exc:
            raise _write_error(exc, path) from exc
        finally:
            if raw is not None:
                raw.close()
