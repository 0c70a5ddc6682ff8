"""The single error hierarchy of ckptio.

Every error a user can hit derives from :class:`CheckpointError`. Subclasses also inherit
the closest builtin exception, so ``except FileNotFoundError`` or ``except ValueError``
written before ckptio existed keeps working.
"""

from __future__ import annotations

import os


class CheckpointError(Exception):
    """Base class of every error ckptio raises about a checkpoint or its inputs.

    Args:
        message: what is wrong (and what to do).
        path: the file or folder concerned, put first in the message and kept as ``.path``.
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint, or a file it names, does not exist."""


class CheckpointFormatError(CheckpointError, ValueError):
    """A file exists but its bytes or JSON are not what the format requires."""


class CheckpointCorruptError(CheckpointFormatError):
    """A file is truncated, or its size or checksum differs from the manifest."""


class UnsafeCheckpointError(CheckpointError, PermissionError):
    """A file tries to escape the checkpoint folder or to run code when loaded."""


class StateMismatchError(CheckpointError, ValueError):
    """The checkpoint does not fit the live model or optimizer (keys, shapes, dtypes).

    Args:
        message: what does not fit.
        path: the checkpoint.
        report: the :class:`LoadReport` of a model load, kept as ``.report``.
    """

    def __init__(self, message: str, *, path=None, report=None) -> None:
        self.report = report
        super().__init__(message, path=path)


class CheckpointWriteError(CheckpointError, OSError):
    """Writing or committing a checkpoint failed; the previous checkpoint is untouched."""


class CheckpointExistsError(CheckpointWriteError, FileExistsError):
    """A save would replace or delete checkpoints that belong to another run; nothing was written."""


class StateChangedError(CheckpointWriteError):
    """An async save failed because the live state was modified in place before it was copied
    (outside the boosted optimizer's ``step()`` and model's forward, without ``booster.wait_staged()``)."""


class DistributedCheckpointError(CheckpointError, RuntimeError):
    """One or more ranks failed inside a collective save or load step."""


__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointFormatError",
    "CheckpointCorruptError",
    "UnsafeCheckpointError",
    "StateMismatchError",
    "CheckpointWriteError",
    "CheckpointExistsError",
    "StateChangedError",
    "DistributedCheckpointError",
]
