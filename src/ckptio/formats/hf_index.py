"""The Hugging Face shard index (``*.index.json``) and the checks made on every shard name."""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptio.errors import CheckpointFormatError, CheckpointNotFoundError, UnsafeCheckpointError

MAX_INDEX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ShardIndex:
    path: str
    weight_map: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shard_files(self) -> list[str]:
        """Distinct shard names in first-seen order."""
        return list(dict.fromkeys(self.weight_map.values()))


def check_relative_name(name: object, *, path: str) -> str:
    """A file named by an index must stay inside the checkpoint folder."""
    if not isinstance(name, str) or not name:
        raise CheckpointFormatError(f"shard name must be a non-empty string, got {name!r}", path=path)
    if "\\" in name or "\x00" in name:
        raise UnsafeCheckpointError(f"shard name {name!r} contains a forbidden character", path=path)
    norm = posixpath.normpath(name)
    if posixpath.isabs(name) or norm == ".." or norm.startswith("../") or norm == ".":
        raise UnsafeCheckpointError(f"shard name {name!r} points outside the checkpoint folder", path=path)
    return norm


def read_json_file(path: str | os.PathLike, *, what: str, max_bytes: int = MAX_INDEX_BYTES) -> Any:
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise CheckpointFormatError(f"{what} is {size} bytes, more than the {max_bytes} allowed", path=path)
        with open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{what} does not exist", path=path) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointFormatError(f"{what} is not valid JSON: {exc}", path=path) from exc


def parse_index(data: Any, *, path: str) -> ShardIndex:
    if not isinstance(data, dict):
        raise CheckpointFormatError("index JSON must be an object", path=path)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointFormatError("index JSON has no 'weight_map' object", path=path)
    metadata = data.get("metadata", {}) or {}
    if not isinstance(metadata, dict):
        raise CheckpointFormatError("index 'metadata' must be an object", path=path)
    total = metadata.get("total_size")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int | float) or total < 0):
        raise CheckpointFormatError(f"index 'total_size' must be a number, got {total!r}", path=path)
    checked = {}
    for key, name in weight_map.items():
        checked[str(key)] = check_relative_name(name, path=path)
    return ShardIndex(path=path, weight_map=checked, metadata=metadata)


def read_index(path: str | os.PathLike) -> ShardIndex:
    path = os.fspath(path)
    index = parse_index(read_json_file(path, what="index file"), path=path)
    folder = Path(path).resolve().parent
    for name in index.shard_files:
        if folder not in (folder / name).resolve().parents:
            raise UnsafeCheckpointError(f"shard {name!r} resolves outside {folder}", path=path)
    return index


def index_json(weight_map: dict[str, str], total_size: int, extra_metadata: dict[str, Any] | None = None) -> bytes:
    metadata: dict[str, Any] = {"total_size": int(total_size)}
    metadata.update(extra_metadata or {})
    return (json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2) + "\n").encode("utf-8")
