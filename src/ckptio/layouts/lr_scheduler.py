"""LR scheduler state to a file and back.

The file is JSON (``{"format": "ckptio-lr-scheduler", "format_version": 1, "state": ...}``,
values in :mod:`ckptio.formats.tagged_json`'s tagged form) when every value of the
``state_dict()`` allows it, which covers torch's schedulers (LambdaLR's ``lr_lambdas`` are
``None`` or plain dicts; SequentialLR / ChainedScheduler nest their schedulers' dicts). It is
a ``torch.save`` file otherwise, or when the path ends in ``.pt``, ``.pth`` or ``.bin``.
Loading looks at the bytes, so both load whatever the name, and so does the ``torch.save``
file ColossalAI writes (read with ``weights_only=True``).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from ckptio.errors import CheckpointFormatError, CheckpointNotFoundError
from ckptio.formats import tagged_json, torch_format
from ckptio.formats.hf_index import read_json_file

FORMAT = "ckptio-lr-scheduler"
FORMAT_VERSION = 1
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def scheduler_file_bytes(state: dict[str, Any], *, prefer_torch: bool = False) -> bytes:
    """The file for a scheduler's ``state_dict()``: our JSON when every value has an exact JSON
    form (and ``prefer_torch`` is False), else a ``torch.save`` file."""
    if not prefer_torch:
        try:
            body = {"format": FORMAT, "format_version": FORMAT_VERSION, "state": tagged_json.encode(state)}
            return (json.dumps(body, indent=1) + "\n").encode("utf-8")
        except tagged_json.NotJSONable:
            pass
    buffer = io.BytesIO()
    torch_format.save(state, buffer)
    return buffer.getvalue()


def prefers_torch(name: str | os.PathLike) -> bool:
    """A path ending in ``.pt``/``.pth``/``.bin`` asks for a torch file."""
    return os.fspath(name).lower().endswith(TORCH_SUFFIXES)


def read_lr_scheduler_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The saved ``state_dict()``, from our JSON or any ``torch.save`` file."""
    path = os.fspath(checkpoint)
    try:
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
    except FileNotFoundError:
        raise CheckpointNotFoundError("LR scheduler file does not exist", path=path) from None
    except IsADirectoryError:
        raise CheckpointFormatError("expected an LR scheduler file, found a folder", path=path) from None
    if head.startswith(b"{"):
        data = read_json_file(path, what="LR scheduler file")
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("state"), dict):
            raise CheckpointFormatError(f"not a ckptio LR scheduler file (format {FORMAT!r} expected)", path=path)
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointFormatError(f"LR scheduler format_version {version!r} is not supported", path=path)
        try:
            return tagged_json.decode(data["state"])
        except ValueError as exc:
            raise CheckpointFormatError(f"malformed LR scheduler state: {exc}", path=path) from exc
    state = torch_format.load(path)
    if not isinstance(state, dict):
        raise CheckpointFormatError("LR scheduler file must hold a state dict", path=path)
    return state


def check_lr_scheduler_state(lr_scheduler: Any, state: dict[str, Any], checkpoint: str | os.PathLike) -> None:
    """Refuse a state that is not this scheduler's, before anything changes."""
    # torch's schedulers take any dict (``__dict__.update``): refuse one that lacks this
    # scheduler's public settings (another scheduler's state, or not a scheduler's at all).
    # Private keys (``_is_initial``, ...) come and go between torch versions, so they may differ.
    expected = {k for k in lr_scheduler.state_dict() if not k.startswith("_")}
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointFormatError(
            f"not a state of {type(lr_scheduler).__name__}: it lacks {missing}", path=checkpoint
        )


def apply_lr_scheduler_state(lr_scheduler: Any, state: dict[str, Any], checkpoint: str | os.PathLike) -> None:
    try:
        lr_scheduler.load_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise CheckpointFormatError(f"the LR scheduler refused the saved state: {exc}", path=checkpoint) from exc


def load_lr_scheduler_state(lr_scheduler: Any, checkpoint: str | os.PathLike) -> None:
    state = read_lr_scheduler_state(checkpoint)
    check_lr_scheduler_state(lr_scheduler, state, checkpoint)
    apply_lr_scheduler_state(lr_scheduler, state, checkpoint)
