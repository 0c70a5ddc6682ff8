"""Storage sees bytes under relative names, never tensors.

A :class:`FileWriter` writes whole files into one staging folder and returns a
:class:`FileRecord` per file (size and checksum, computed while the bytes stream through,
not in a second pass). The commit protocol lives in :mod:`ckptio.storage.atomic`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

import xxhash

from ckptio.errors import CheckpointWriteError

CHECKSUM_ALGORITHM = "xxh3_128"
_ABANDONED = threading.Event()


class WritesAbandoned(CheckpointWriteError):
    """The process is exiting and was told not to wait: the save stops and removes what it staged."""


def abandon_writes() -> None:
    """Make every write in flight in this process fail at its next piece, so each save aborts
    (its staging removed by its own thread) instead of being killed mid-file at exit. Called
    when the interpreter's exit, waiting for an async save, is interrupted again (Ctrl-C)."""
    _ABANDONED.set()


def check_abandoned(path: str | None = None) -> None:
    if _ABANDONED.is_set():
        raise WritesAbandoned("save abandoned: the process is exiting, interrupted; nothing committed", path=path)


def new_hasher():
    return xxhash.xxh3_128()


@dataclass(frozen=True)
class FileRecord:
    """One committed file: its name relative to the checkpoint folder, bytes and checksum.

    ``holds_tensors`` marks the weight files the engine spread over the ranks (the manifest's
    ``written_by_rank`` lists those); ``reused`` the files linked from an earlier checkpoint
    instead of written (:mod:`ckptio.storage.reuse`); neither is stored in the manifest.
    ``pieces`` fingerprints a file several ranks wrote in place from the hashes of their pieces
    (no rank saw the whole file), so that the next save from the same layout can tell, before
    writing, that its bytes did not change; it is stored."""

    name: str
    size: int
    checksum: str
    holds_tensors: bool = field(default=False, compare=False)
    pieces: str | None = field(default=None, compare=False)
    reused: bool = field(default=False, compare=False)

    def to_json(self) -> dict:
        body = {"size": self.size, CHECKSUM_ALGORITHM: self.checksum}
        if self.pieces is not None:
            body["pieces"] = self.pieces
        return body


@dataclass(frozen=True)
class Reusable:
    """A committed file a save may link instead of writing the same bytes again: where it is,
    what its manifest says of it, and which file it was when indexed (``identity``: device and
    inode; a link must land on that very file, not on one a later save put under its name)."""

    path: str
    size: int
    checksum: str
    pieces: str | None
    identity: tuple[int, int]

    def record(self, name: str) -> FileRecord:
        return FileRecord(name, self.size, self.checksum, pieces=self.pieces, reused=True)


@dataclass(frozen=True)
class ReuseIndex:
    """The files of earlier checkpoints a save may reuse, by content: ``(size, checksum)`` for a
    writer that sees a whole file's bytes, ``(size, pieces)`` for files written in place by
    several ranks (:attr:`FileRecord.pieces`). Built by :func:`ckptio.storage.reuse.index_folders`."""

    by_checksum: dict[tuple[int, str], Reusable]
    by_pieces: dict[tuple[int, str], Reusable]
    sizes: frozenset[int] = frozenset()

    def has_size(self, size: int) -> bool:
        """Whether any indexed file has ``size`` bytes (only then is a file worth hashing first)."""
        return size in self.sizes

    def by_content(self, size: int, checksum: str) -> Reusable | None:
        return self.by_checksum.get((size, checksum))

    def by_layout(self, size: int, pieces: str) -> Reusable | None:
        return self.by_pieces.get((size, pieces))


class HashingStream:
    """A write-only stream that counts and hashes what passes through (for ``torch.save``)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hasher = new_hasher()
        self.size = 0

    def write(self, data) -> int:
        check_abandoned()
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


class PositionalFile(ABC):
    """A file several writers fill at known offsets (:meth:`FileWriter.open_at`)."""

    @abstractmethod
    def write_at(self, offset: int, views: list[memoryview]) -> None:
        """Write ``views`` back to back starting at byte ``offset``."""

    @abstractmethod
    def close(self) -> None:
        """Make what this writer wrote durable, then close."""


class FileWriter(ABC):
    """Writes files into one staging location; every call returns the file's record.

    A writer with ``positional = True`` also lets several ranks fill one file in place:
    :meth:`create` (one writer: the head and the final size), :meth:`open_at` (every writer:
    bytes at offsets), then :meth:`record_of` (one writer, once all are durable: size and
    checksum, read back since no single writer saw every byte).
    """

    positional: bool = False
    #: committed files this save may link instead of writing bytes they already hold (set by
    #: the save for storages that can link, :meth:`link`); None: write everything
    reuse: ReuseIndex | None = None

    @abstractmethod
    def write(self, name: str, chunks: Iterable[bytes | memoryview]) -> FileRecord:
        """Write a whole file from byte chunks, durably (flushed and synced)."""

    def link(self, name: str, source: Reusable) -> FileRecord | None:
        """Make ``name`` the committed file ``source`` (a hard link: no byte is written), or
        None where that cannot be done (another filesystem, the file gone or replaced since
        it was indexed); the caller then writes the bytes."""
        return None

    def write_or_link(self, name: str, size: int, chunks: Callable[[], Iterable[bytes | memoryview]]) -> FileRecord:
        """Write a file of ``size`` bytes, or link a committed file of :attr:`reuse` that holds
        exactly these bytes. ``chunks()`` yields the bytes; it is called twice when a file of
        this size exists (once to hash, once to write if none matches), else once."""
        reuse = self.reuse
        if reuse is not None and reuse.has_size(size):
            hasher, total = new_hasher(), 0
            for chunk in chunks():
                view = memoryview(chunk).cast("B")
                hasher.update(view)
                total += len(view)
            found = reuse.by_content(total, hasher.hexdigest())
            if found is not None:
                record = self.link(name, found)
                if record is not None:
                    return record
        return self.write(name, chunks())

    @abstractmethod
    def open_stream(self, name: str):
        """A context manager yielding a :class:`HashingStream`; its record is in ``.record`` after."""

    def create(self, name: str, size: int, head: bytes) -> None:
        """Create ``name`` holding ``head`` and ``size`` bytes in all (the rest written in place)."""
        raise NotImplementedError(f"{type(self).__name__} cannot write files in place")

    def open_at(self, name: str) -> PositionalFile:
        """Open an existing file (made by :meth:`create`) to write at offsets."""
        raise NotImplementedError(f"{type(self).__name__} cannot write files in place")

    def record_of(self, name: str) -> FileRecord:
        """Size and checksum of a file written in place, read back."""
        raise NotImplementedError(f"{type(self).__name__} cannot write files in place")


class Commit(ABC):
    """One save's way to become visible all at once; the storage picks the strategy.

    Local disk stages into a hidden sibling and renames it into place
    (:mod:`ckptio.storage.atomic`); object stores write under a fresh version prefix and flip
    a commit marker last (:mod:`ckptio.storage.fsspec_storage`). Call order, the same for
    both: every rank builds the commit with the same ``token``; the master calls
    :meth:`begin`; every rank writes its files through :attr:`writer` (a one-file save
    writes exactly one file, named :attr:`file_name`); the master calls :meth:`commit` with
    every rank's records, or :meth:`abort` if any rank failed.
    """

    #: where the files of this save go (relative names)
    writer: FileWriter
    #: for a one-file save, the name its only file must be written under; None for a folder
    file_name: str | None = None
    #: the checkpoint as the user named it (a path or URL), for messages
    target: str

    @abstractmethod
    def begin(self) -> Commit:
        """Prepare the staging area (master only); returns self."""

    @abstractmethod
    def commit(self, records: Iterable[FileRecord], manifest_extra: dict | None = None) -> None:
        """Make the save visible: manifest (folders), durability, the atomic switch (master only)."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what this save staged; the previous checkpoint stays as it was (master only)."""

    def reuse_index(self, references: Iterable[str] = ()) -> ReuseIndex | None:
        """The committed files this save may link instead of writing (master only, after
        :meth:`begin`): those of the checkpoint being replaced and of ``references``. None for a
        storage that cannot link."""
        return None
