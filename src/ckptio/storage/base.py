"""Storage sees bytes under relative names, never tensors.

A :class:`FileWriter` writes whole files into one staging folder and returns a
:class:`FileRecord` per file (size and checksum, computed while the bytes stream through,
not in a second pass). The commit protocol lives in :mod:`ckptio.storage.atomic`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

import xxhash

CHECKSUM_ALGORITHM = "xxh3_128"


def new_hasher():
    return xxhash.xxh3_128()


@dataclass(frozen=True)
class FileRecord:
    """One committed file: its name relative to the checkpoint folder, bytes and checksum."""

    name: str
    size: int
    checksum: str

    def to_json(self) -> dict:
        return {"size": self.size, CHECKSUM_ALGORITHM: self.checksum}


class HashingStream:
    """A write-only stream that counts and hashes what passes through (for ``torch.save``)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hasher = new_hasher()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        written = 0
        while written < len(view):
            n = self._raw.write(view[written:])
            written += n if n is not None else len(view) - written
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()


class FileWriter(ABC):
    """Writes files into one staging location; every call returns the file's record."""

    @abstractmethod
    def write(self, name: str, chunks: Iterable[bytes | memoryview]) -> FileRecord:
        """Write a whole file from byte chunks, durably (flushed and synced)."""

    @abstractmethod
    def open_stream(self, name: str):
        """A context manager yielding a :class:`HashingStream`; its record is in ``.record`` after."""
