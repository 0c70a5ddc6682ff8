"""The header every versioned ckptio JSON document carries: ``format`` and ``format_version``.

One check for all of them, so every such file is refused the same way when it is something
else (a foreign JSON, another kind of ckptio file) or comes from a newer ckptio.
"""

from __future__ import annotations

from typing import Any

from ckptio.errors import CheckpointFormatError


def check_versioned(document: Any, *, format: str | None, max_version: int, what: str, path: Any) -> dict[str, Any]:
    """Return ``document`` if it is a dict of ``format`` (None: not checked) whose ``format_version``
    this ckptio reads; else raise :class:`CheckpointFormatError` naming ``what`` and ``path``."""
    if not isinstance(document, dict) or (format is not None and document.get("format") != format):
        raise CheckpointFormatError(f"not a ckptio {what} (format {format!r} expected)", path=path)
    version = document.get("format_version")
    if not isinstance(version, int) or version > max_version:
        raise CheckpointFormatError(
            f"{what} format_version {version!r} is not supported (this ckptio reads <= {max_version})", path=path
        )
    return document
