"""The commit marker: the one object that makes a version of a folder the checkpoint.

On an object store a folder save writes ``URL/ckptio-v-TOKEN/...`` and then, last,
``URL/_CKPTIO_COMMITTED`` naming that version (:mod:`ckptio.storage.fsspec_storage`). The same
layout also reaches local disk when a checkpoint is copied down with an ordinary sync tool
(``aws s3 sync s3://bucket/ckpt ckpt``): :func:`committed_folder` resolves it there, so such a
folder loads, inspects and verifies like the URL it came from. Parsing never imports fsspec.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ckptio.errors import CheckpointFormatError, CheckpointNotFoundError
from ckptio.formats.naming import COMMIT_MARKER, REMOTE_VERSION_PREFIX

MARKER_FORMAT = "ckptio-commit"
MARKER_VERSION = 1
MAX_MARKER_BYTES = 1024 * 1024


def marker_bytes(version: str, files: int) -> bytes:
    body: dict[str, Any] = {"format": MARKER_FORMAT, "format_version": MARKER_VERSION, "version": version}
    body["files"] = files
    return (json.dumps(body, indent=1) + "\n").encode("utf-8")


def parse_marker(raw: bytes, *, where: str) -> str:
    """The version (``ckptio-v-TOKEN``) a marker's bytes name; malformed markers raise."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointFormatError(f"commit marker is not valid JSON: {exc}", path=where) from exc
    version = body.get("version") if isinstance(body, dict) else None
    if (
        not isinstance(body, dict)
        or body.get("format") != MARKER_FORMAT
        or not isinstance(version, str)
        or not version.startswith(REMOTE_VERSION_PREFIX)
        or "/" in version
        or "\\" in version
        or version in (".", "..")
    ):
        raise CheckpointFormatError("commit marker is malformed (expected a ckptio-commit version)", path=where)
    if not isinstance(body.get("format_version"), int) or body["format_version"] > MARKER_VERSION:
        raise CheckpointFormatError(
            f"commit marker format_version {body.get('format_version')!r} unsupported", path=where
        )
    return version


def incomplete(where: str) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        f"incomplete checkpoint: files were uploaded but the commit marker {COMMIT_MARKER} was never "
        "written (the save was interrupted); it is not loaded",
        path=where,
    )


def committed_folder(path: str | os.PathLike) -> Path:
    """A local folder holding a commit marker (an object-store checkpoint synced down): the
    version folder the marker names. A folder of versions without a marker is an interrupted
    upload and is refused, as on the store. Anything else is returned as it is."""
    path = Path(path)
    marker = path / COMMIT_MARKER
    if not path.is_dir():
        return path
    if not marker.is_file():
        if any(p.name.startswith(REMOTE_VERSION_PREFIX) and p.is_dir() for p in path.iterdir()):
            raise incomplete(os.fspath(path))
        return path
    with open(marker, "rb") as fh:
        version = parse_marker(fh.read(MAX_MARKER_BYTES), where=os.fspath(marker))
    folder = path / version
    if not folder.is_dir():
        raise CheckpointNotFoundError(
            f"{COMMIT_MARKER} names the version {version}, which is not in this folder (copied in part?)",
            path=path,
        )
    return folder
