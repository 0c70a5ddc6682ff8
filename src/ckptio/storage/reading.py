"""Reading weights files that may live in an object store, by byte ranges.

A load of a URL must not download the whole checkpoint to every rank: each rank reads only the
bytes of its own boxes. The small files (indexes, manifest, JSON, torch files) are copied to a
local stand-in folder as usual; every safetensors file there is an empty placeholder registered
here, and :func:`open_source` reads it from the store by byte ranges (one ranged GET per run of
bytes a box needs). Readers ask :func:`open_source` / :func:`file_size` for any path and never
need to know where the bytes are.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from ckptio.formats.safetensors_format import LocalFile

_REMOTE: dict[str, RemoteObject] = {}
_LOCK = threading.Lock()
_FETCHED = [0]  # bytes read from stores by this process (tests and benchmarks read it)


@dataclass(frozen=True)
class RemoteObject:
    """An object in a store standing behind a local placeholder path."""

    fs: Any
    path: str
    size: int


class RemoteFile:
    """An object read at offsets, each read one ranged request."""

    def __init__(self, obj: RemoteObject) -> None:
        self.obj = obj
        self.size = obj.size
        self.identity = ("remote", obj.path, obj.size)  # a stored version is immutable: its name and size

    def read_into(self, offset: int, view: memoryview) -> int:
        end = min(offset + len(view), self.size)
        if offset >= end:
            return 0
        data = self.obj.fs.cat_file(self.obj.path, start=offset, end=end)
        view[: len(data)] = data
        with _LOCK:
            _FETCHED[0] += len(data)
        return len(data)

    def close(self) -> None:
        """Nothing is held open between reads."""


def register(local_path: str | os.PathLike, obj: RemoteObject) -> None:
    with _LOCK:
        _REMOTE[os.path.abspath(local_path)] = obj


def unregister(local_path: str | os.PathLike) -> None:
    with _LOCK:
        _REMOTE.pop(os.path.abspath(local_path), None)


def remote_object(path: str | os.PathLike) -> RemoteObject | None:
    """The object a placeholder stands for, or None for a real local file."""
    with _LOCK:
        return _REMOTE.get(os.path.abspath(path))


def open_source(path: str | os.PathLike):
    """``path`` opened for reads at offsets: from the store when it is a placeholder."""
    obj = remote_object(path)
    return RemoteFile(obj) if obj is not None else LocalFile(path)


def file_size(path: str | os.PathLike) -> int:
    obj = remote_object(path)
    return obj.size if obj is not None else os.stat(path).st_size


def bytes_fetched() -> int:
    """Bytes this process has read from object stores by byte ranges."""
    with _LOCK:
        return _FETCHED[0]
