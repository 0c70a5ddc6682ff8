"""Telling URLs from local paths (no fsspec import: local paths never pay for it)."""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

# `C:\\x` is a Windows drive, not a URL scheme; schemes have at least two letters.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")
_FILE_SCHEME = "file://"


def is_url(checkpoint: str | os.PathLike | object) -> bool:
    """True for ``scheme://...`` strings other than ``file://`` (which is plain local disk)."""
    if not isinstance(checkpoint, str):
        return False
    return bool(_URL_RE.match(checkpoint)) and not checkpoint.lower().startswith(_FILE_SCHEME)


def local_path(checkpoint: str | os.PathLike) -> str:
    """``file:///x`` -> ``/x``; any other path or URL unchanged, as a string.

    As in RFC 8089 (and pathlib's ``as_uri``), the host is empty or ``localhost`` and
    percent-escapes are decoded; any other form raises, so ``file://`` never reaches the code
    below as a relative path ``./file:/x``.
    """
    text = os.fspath(checkpoint)
    if text[: len(_FILE_SCHEME)].lower() != _FILE_SCHEME:
        return text
    rest = text[len(_FILE_SCHEME) :]
    if rest[: len("localhost/")].lower() == "localhost/":
        rest = rest[len("localhost") :]
    if not rest.startswith("/"):
        from ckptio.errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(
            "a file:// URL names a path on this machine and must be absolute: file:///abs/path "
            "(or file://localhost/abs/path)",
            path=text,
        )
    return unquote(rest)


def url_basename(url: str) -> str:
    """The last component of a URL's path (``s3://b/run/model.safetensors`` -> ``model.safetensors``)."""
    return url.rstrip("/").rsplit("/", 1)[-1] or "checkpoint"


def join(base: str | os.PathLike, name: str) -> str:
    """``base/name`` for a local path or a URL alike."""
    text = os.fspath(base)
    return f"{text.rstrip('/')}/{name}" if is_url(text) else os.path.join(text, name)
