"""Where a checkpoint lives: a local path (the fast path) or an fsspec URL (``s3://``, ``memory://``).

The one question every entry point asks before touching a checkpoint is :func:`is_url`;
local paths never import fsspec.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import unquote

from ckptio.errors import CheckpointNotFoundError

T = TypeVar("T")

# `C:\\x` is a Windows drive, not a URL scheme; schemes have at least two letters.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")


def is_url(checkpoint: str | os.PathLike | object) -> bool:
    """True for ``scheme://...`` strings other than ``file://`` (which is plain local disk)."""
    if not isinstance(checkpoint, str):
        return False
    return bool(_URL_RE.match(checkpoint)) and not checkpoint.lower().startswith("file://")


_FILE_SCHEME = "file://"


def local_path(checkpoint: str | os.PathLike) -> str:
    """``file:///x`` -> ``/x``; any other path or URL unchanged, as a string.

    Every public entry point (Booster save/load, ``save_checkpoint`` / ``load_checkpoint``,
    ``CheckpointManager``, the CLI) passes its path through here once, so ``file://`` never
    reaches the code below as a relative path ``./file:/x``. As in RFC 8089 (and pathlib's
    ``as_uri``), the host is empty or ``localhost`` and percent-escapes are decoded.
    """
    text = os.fspath(checkpoint)
    if text[: len(_FILE_SCHEME)].lower() != _FILE_SCHEME:
        return text
    rest = text[len(_FILE_SCHEME) :]
    if rest[: len("localhost/")].lower() == "localhost/":
        rest = rest[len("localhost") :]
    if not rest.startswith("/"):
        raise CheckpointNotFoundError(
            "a file:// URL names a path on this machine and must be absolute: file:///abs/path "
            "(or file://localhost/abs/path)",
            path=text,
        )
    return unquote(rest)


def url_basename(url: str) -> str:
    """The last component of a URL's path (``s3://b/run/model.safetensors`` -> ``model.safetensors``)."""
    return url.rstrip("/").rsplit("/", 1)[-1] or "checkpoint"


def on_local_path(checkpoint: str, fn: Callable[[str], T], *, save: bool) -> T:
    """Run ``fn(path)`` on ``checkpoint`` itself, or, for a URL, on a local copy.

    A save writes the local copy and then uploads it with a commit marker written last; a
    load downloads the committed version first (see :mod:`ckptio.storage.fsspec_storage`).
    """
    if not is_url(checkpoint):
        return fn(checkpoint)
    from ckptio.storage import fsspec_storage

    with (fsspec_storage.saving if save else fsspec_storage.loading)(checkpoint) as local:
        return fn(local)
