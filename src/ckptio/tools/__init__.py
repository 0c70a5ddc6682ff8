"""Look inside, check, convert and compare checkpoints from Python; ``ckptio`` (the CLI) prints these.

Every function takes local paths or fsspec URLs and returns data (dicts, lists of strings):

* :func:`inspect_checkpoint` -- what a path holds (model, optimizer, training checkpoint, a run).
* :func:`verify_checkpoint` -- ``(passed, problems)``: manifest sizes and checksums, headers, indexes.
* :func:`convert_checkpoint` -- rewrite a model checkpoint (consolidate, re-shard, bin <-> safetensors).
* :func:`diff_checkpoints` -- compare two model checkpoints tensor by tensor.
"""

from __future__ import annotations

import os

from ckptio.storage.location import readable
from ckptio.tools.convert import convert_checkpoint
from ckptio.tools.diff import diff_checkpoints
from ckptio.tools.inspect import inspect_checkpoint
from ckptio.tools.verify import verify_path


def verify_checkpoint(path: str | os.PathLike, *, checksums: bool = True) -> tuple[list[str], list[str]]:
    """Check whatever ``path`` holds (model, optimizer, LR scheduler file, training checkpoint or
    a run's folder): manifest sizes and checksums, headers, index entries, each part parsed.

    Args:
        path: local or an fsspec URL.
        checksums: re-hash every file against the manifest (False: sizes only).

    Returns:
        ``(passed checks, problems)`` as sentences naming the file; no problems means intact.
    """
    with readable(path) as local:
        return verify_path(local, checksums)


__all__ = ["convert_checkpoint", "diff_checkpoints", "inspect_checkpoint", "verify_checkpoint"]
