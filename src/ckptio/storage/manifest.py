"""The manifest: every file of a checkpoint folder with its size and checksum.

It is JSON with a ``format_version`` so later versions can extend it, and it is written
last inside the staging folder, just before the folder is committed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptio.errors import CheckpointFormatError
from ckptio.formats.hf_index import check_relative_name, read_json_file
from ckptio.formats.naming import MANIFEST
from ckptio.storage.base import CHECKSUM_ALGORITHM, FileRecord

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    files: dict[str, FileRecord]
    extra: dict[str, Any]

    def to_bytes(self) -> bytes:
        body = {
            "format": "ckptio-manifest",
            "format_version": FORMAT_VERSION,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            **self.extra,
            "files": {name: rec.to_json() for name, rec in sorted(self.files.items())},
        }
        return (json.dumps(body, indent=1) + "\n").encode("utf-8")


def parse_manifest(data: Any, *, path: str) -> Manifest:
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise CheckpointFormatError("manifest must be an object with a 'files' object", path=path)
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"manifest format_version {version!r} is not supported (this ckptio reads <= {FORMAT_VERSION})",
            path=path,
        )
    algorithm = data.get("checksum_algorithm", CHECKSUM_ALGORITHM)
    if algorithm != CHECKSUM_ALGORITHM:
        raise CheckpointFormatError(f"unknown checksum algorithm {algorithm!r}", path=path)
    files = {}
    for name, entry in data["files"].items():
        name = check_relative_name(name, path=path)
        if (
            not isinstance(entry, dict)
            or type(entry.get("size")) is not int
            or not isinstance(entry.get(CHECKSUM_ALGORITHM), str)
        ):
            raise CheckpointFormatError(f"manifest entry for {name!r} is malformed", path=path)
        pieces = entry.get("pieces")
        if pieces is not None and not isinstance(pieces, str):
            raise CheckpointFormatError(f"manifest entry for {name!r} has malformed pieces {pieces!r}", path=path)
        files[name] = FileRecord(name, entry["size"], entry[CHECKSUM_ALGORITHM], pieces=pieces)
    extra = {k: v for k, v in data.items() if k not in ("files",)}
    return Manifest(files, extra)


def read_manifest(folder: str | os.PathLike) -> Manifest | None:
    """The folder's manifest, or ``None`` for folders written by other tools."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return parse_manifest(read_json_file(path, what="manifest"), path=str(path))
