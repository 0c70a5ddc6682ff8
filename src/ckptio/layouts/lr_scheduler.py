"""LR scheduler state to a file and back.

The file is ``torch.save(lr_scheduler.state_dict())``, what ColossalAI writes and reads
(``torch.load``, whose default is ``weights_only=True`` since torch 2.6), so a scheduler file
of ckptio loads in ColossalAI and the other way round. torch's schedulers keep plain values
(LambdaLR's ``lr_lambdas`` are ``None`` or plain dicts; SequentialLR / ChainedScheduler nest
their schedulers' dicts); a save checks that ``torch.load(weights_only=True)`` reads the bytes
back, and refuses a state holding anything else, before anything is written.

Earlier versions of ckptio wrote JSON (``{"format": "ckptio-lr-scheduler", "format_version":
1, "state": ...}``, values in :mod:`ckptio.formats.tagged_json`'s tagged form); loading looks at
the bytes, so those files still load, whatever their name.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Callable
from typing import Any

import torch

from ckptio.errors import CheckpointFormatError, CheckpointNotFoundError, StateMismatchError
from ckptio.formats import tagged_json, torch_format
from ckptio.formats.hf_index import read_json_file
from ckptio.formats.versioned import check_versioned
from ckptio.layouts.detect import detect, torch_kind, wrong_kind

FORMAT = "ckptio-lr-scheduler"  # the JSON files of earlier versions (read only)
FORMAT_VERSION = 1


def scheduler_file_bytes(state: dict[str, Any], *, path: str | os.PathLike | None = None) -> bytes:
    """The ``torch.save`` bytes of a scheduler's ``state_dict()``, checked to load back with
    ``weights_only=True`` (ColossalAI's and our reader); ``path`` names the file in errors."""
    try:
        buffer = io.BytesIO()
        torch_format.save(state, buffer)
        data = buffer.getvalue()
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (unpicklable, or refused on the way back: not plain values)
        detail = str(exc).strip().splitlines()
        raise CheckpointFormatError(
            "the LR scheduler's state_dict() holds values that torch.load(weights_only=True) refuses (ColossalAI "
            "and ckptio read the file that way), so nothing was saved; keep plain values (numbers, strings, lists, "
            f"dicts, tensors) in it. Detail: {detail[0] if detail else exc!r}",
            path=path,
        ) from exc
    return data


def read_lr_scheduler_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The saved ``state_dict()``, from any ``torch.save`` file or the JSON of earlier versions."""
    path = os.fspath(checkpoint)
    if not os.path.exists(path):
        raise CheckpointNotFoundError("LR scheduler file does not exist", path=path)
    located = detect(path, "lr_scheduler")  # a file of another kind is named as what it is
    if located.layout == "json":
        data = read_json_file(path, what="LR scheduler file")
        check_versioned(data, format=None, max_version=FORMAT_VERSION, what="LR scheduler file", path=path)
        if not isinstance(data.get("state"), dict):
            raise CheckpointFormatError("LR scheduler file has no 'state' object", path=path)
        try:
            return tagged_json.decode(data["state"])
        except ValueError as exc:
            raise CheckpointFormatError(f"malformed LR scheduler state: {exc}", path=path) from exc
    state = torch_format.load(path)
    if not isinstance(state, dict):
        raise CheckpointFormatError("LR scheduler file must hold a state dict", path=path)
    return state


def load_lr_scheduler_state(lr_scheduler: Any, checkpoint: str | os.PathLike) -> None:
    prepare_lr_scheduler_load(lr_scheduler, checkpoint)()


def prepare_lr_scheduler_load(lr_scheduler: Any, checkpoint: str | os.PathLike) -> Callable[[], None]:
    """Read and check the saved state against ``lr_scheduler``, changing nothing; returns the
    call that loads it.

    torch's schedulers take any dict (``__dict__.update``), so the state must hold this
    scheduler's public settings (another scheduler's state is refused with
    :class:`StateMismatchError`: the job changed, not the file), and it is tried first on a
    copy of the scheduler that shares its optimizer. Private keys (``_is_initial``, ...) come
    and go between torch versions, so they may differ.
    """
    state = read_lr_scheduler_state(checkpoint)
    expected = {k for k in lr_scheduler.state_dict() if not k.startswith("_")}
    missing = sorted(expected - set(state))
    if missing and not expected & set(state):
        found = torch_kind(state)
        if found[0] not in (None, "lr_scheduler"):
            raise wrong_kind(checkpoint, "lr_scheduler", found)
        raise CheckpointFormatError(
            f"not an LR scheduler state: it has none of {type(lr_scheduler).__name__}'s settings {sorted(expected)}",
            path=checkpoint,
        )
    if missing:
        raise StateMismatchError(
            f"holds the state of another LR scheduler, not of {type(lr_scheduler).__name__}: it lacks {missing}",
            path=checkpoint,
        )
    trial = _copy_sharing_optimizer(lr_scheduler)
    if trial is not None:
        _load(trial, state, checkpoint)
    return lambda: _load(lr_scheduler, state, checkpoint)


def _copy_sharing_optimizer(lr_scheduler: Any) -> Any:
    """A deep copy of the scheduler (nested schedulers, lambdas' state) that shares the optimizer,
    or None when the scheduler cannot be copied (then only the keys were checked)."""
    optimizer = getattr(lr_scheduler, "optimizer", None)
    memo = {id(optimizer): optimizer} if optimizer is not None else {}
    try:
        return copy.deepcopy(lr_scheduler, memo)
    except Exception:  # noqa: BLE001 (an uncopyable attribute: fall back to the key check)
        return None


def _load(lr_scheduler: Any, state: dict[str, Any], checkpoint: str | os.PathLike) -> None:
    try:
        lr_scheduler.load_state_dict(copy.deepcopy(state))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise StateMismatchError(f"the LR scheduler refused the saved state: {exc}", path=checkpoint) from exc
