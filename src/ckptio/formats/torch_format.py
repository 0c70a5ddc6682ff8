"""``torch.save`` files (``.bin``, ``.pt``, ``.pth``), read without ever running pickled code."""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, BinaryIO

import torch

from ckptio.errors import (
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
)


def save(obj: Any, fh: BinaryIO) -> None:
    """Write ``obj`` in torch's zip format to an open binary stream."""
    torch.save(obj, fh)


def load(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and the problem.

    ``mmap=True`` maps tensor data instead of reading it, so a shard costs memory only for
    what is copied out of it; files in torch's legacy (non-zip) format fall back to a read.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError("file does not exist", path=path)
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        if path.lower().endswith(".safetensors"):  # torch.load would hand such a name to safetensors
            with open(path, "rb") as fh:
                return torch.load(fh, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported" in text or "GLOBAL" in text:
            raise UnsafeCheckpointError(
                "refused to load: the pickle references code outside the allowed tensor types "
                "(weights_only=True). Only load it with weights_only=False if you trust its source. "
                f"Detail: {text.splitlines()[0] if text else exc!r}",
                path=path,
            ) from exc
        raise CheckpointCorruptError(f"not a valid torch file: {exc}", path=path) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointCorruptError(f"cannot read torch file (truncated or corrupt?): {exc}", path=path) from exc
    except Exception as exc:  # noqa: BLE001 (the unpickler raises KeyError, IndexError... on bytes that are no pickle)
        raise CheckpointCorruptError(f"not a torch file: the unpickler failed with {exc!r}", path=path) from exc


def describe(obj: Any) -> str | None:
    """What a loaded ``torch.save`` object is, in words, when it is one of the states a
    checkpoint holds (so an error can say "this is an optimizer state_dict, not model weights")."""
    if not isinstance(obj, dict) or not obj:
        return None
    if "state" in obj and "param_groups" in obj:
        return "an optimizer state_dict (torch.save)"
    if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return "model weights (torch.save)"
    if "last_epoch" in obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        return "an LR scheduler state_dict (torch.save)"
    return None


def load_tensor_dict(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A torch file that must hold a flat ``{name: tensor}`` dict (a model state dict)."""
    obj = load(path, mmap=mmap)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        what = describe(obj)
        problem = f"this is {what}, not model weights" if what else "expected a dict of tensors keyed by name"
        raise CheckpointFormatError(problem, path=path)
    return obj
