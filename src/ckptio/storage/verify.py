"""Checking files against a folder's manifest: sizes always, checksums on request."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ckptio.errors import CheckpointCorruptError, CheckpointNotFoundError
from ckptio.storage.base import new_hasher
from ckptio.storage.manifest import read_manifest
from ckptio.storage.reading import file_size, open_source

_CHUNK = 8 * 1024 * 1024


def file_checksum(path: str | os.PathLike) -> str:
    hasher = new_hasher()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    source = open_source(path)  # a local file, or an object in a store behind a placeholder
    try:
        offset = 0
        while n := source.read_into(offset, view):
            hasher.update(view[:n])
            offset += n
    finally:
        source.close()
    return hasher.hexdigest()


def check_against_manifest(folder: str | os.PathLike, names: Iterable[str], *, checksums: bool) -> bool:
    """Raise if a listed file is missing, has the wrong size, or (``checksums``) wrong bytes.

    Returns False when the folder has no manifest (written by another tool): nothing to check.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    for name in names:
        record = manifest.files.get(name)
        path = folder / name
        if record is None:
            continue
        try:
            size = file_size(path)
        except FileNotFoundError:
            raise CheckpointNotFoundError("listed in the manifest but missing", path=path) from None
        if size != record.size:
            raise CheckpointCorruptError(
                f"size {size} bytes differs from the manifest's {record.size} (truncated or replaced?)", path=path
            )
        if checksums and file_checksum(path) != record.checksum:
            raise CheckpointCorruptError("checksum differs from the manifest: the bytes are corrupt", path=path)
    return True
