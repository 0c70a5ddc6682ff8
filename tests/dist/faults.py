"""Fault injection for multi-rank tests: every way a rank writes checkpoint bytes, wrapped.

A rank writes a whole file (``engine.write.write_weights_file``: one process, ``torch.save``
files) or pieces of a shared file in place (``storage.local`` positional writes: several ranks,
safetensors). Tests patch both, inside the forked worker, so a fault hits whichever path a save
takes.
"""

from __future__ import annotations

from collections.abc import Callable

from ckptio.engine import write as engine_write
from ckptio.storage import local


def wrap_writes(*, before: Callable[[], None] | None = None, after: Callable[[], None] | None = None) -> None:
    """Call ``before()`` before and ``after()`` after every write of checkpoint bytes in this process."""
    real_file, real_at = engine_write.write_weights_file, local._LocalPositionalFile.write_at

    def write_file(*args, **kwargs):
        if before is not None:
            before()
        record = real_file(*args, **kwargs)
        if after is not None:
            after()
        return record

    def write_at(self, *args, **kwargs):
        if before is not None:
            before()
        real_at(self, *args, **kwargs)
        if after is not None:
            after()

    engine_write.write_weights_file = write_file
    local._LocalPositionalFile.write_at = write_at


def fail_writes(exc: BaseException) -> None:
    """Every write of checkpoint bytes in this process raises ``exc``."""

    def fail() -> None:
        raise exc

    wrap_writes(before=fail)
