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
from ckptio.formats.naming import EXTRA_STATE_SUFFIX


def save(obj: Any, fh: BinaryIO) -> None:
    """Write ``obj`` in torch's zip format to an open binary stream."""
    torch.save(obj, fh)


def _numpy_array_globals() -> list[Any]:
    """What a pickled NumPy array names: its rebuild function (under NumPy 2's module and NumPy 1's,
    whichever wrote it), ``ndarray`` and ``dtype``. They build arrays of numbers from bytes; an
    object array's elements still go through the same refusing unpickler."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    names = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    names += [(core.multiarray._reconstruct, f"{m}.multiarray._reconstruct") for m in ("numpy.core", "numpy._core")]
    dtypes_module = getattr(np, "dtypes", None)
    if dtypes_module is not None:
        names.append(dtypes_module.UInt32DType)
    return names


def load(path: str | os.PathLike, *, mmap: bool = False, numpy_arrays: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and the problem.

    ``mmap=True`` maps tensor data instead of reading it, so a shard costs memory only for
    what is copied out of it; files in torch's legacy (non-zip) format fall back to a read.
    ``numpy_arrays=True`` also accepts NumPy arrays (the RNG state files of transformers.Trainer
    and accelerate hold ``np.random.get_state()``), as transformers and accelerate load them.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError("file does not exist", path=path)
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        if numpy_arrays:
            with torch.serialization.safe_globals(_numpy_array_globals()):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
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
    if {"last_epoch", "_last_lr"} & obj.keys() and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        return "an LR scheduler state_dict (torch.save)"  # every torch scheduler keeps one of the two
    return None


def _not_weights(what: str) -> str:
    """The message for a state of another kind where weights were expected, with the call that loads it."""
    call = ""
    if "optimizer" in what:
        call = "booster.load_optimizer"
    elif "scheduler" in what:
        call = "booster.load_lr_scheduler"
    return f"this is {what}, not model weights" + (f" (load it with {call})" if call else "")


def load_tensor_dict(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A torch file that must hold a flat ``{name: tensor}`` dict (a model state dict)."""
    obj = load(path, mmap=mmap)
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        what = describe(obj)
        problem = _not_weights(what) if what else "expected a dict of tensors keyed by name"
        raise CheckpointFormatError(problem, path=path)
    return obj


def load_weights(path: str | os.PathLike, *, mmap: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A model state dict file: ``({name: tensor}, {name: value})``, the second holding the values
    of ``<module>._extra_state`` keys that are not tensors (``torch.save(model.state_dict())``
    keeps them there); any other value that is not a tensor is refused."""
    obj = load(path, mmap=mmap)
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        what = describe(obj)
        problem = _not_weights(what) if what else "expected a dict of tensors keyed by name"
        raise CheckpointFormatError(problem, path=path)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    extra = {k: v for k, v in obj.items() if k not in tensors}
    odd = [k for k in extra if not k.endswith(EXTRA_STATE_SUFFIX)]
    if odd:
        what = describe(obj)
        if what is not None:
            raise CheckpointFormatError(_not_weights(what), path=path)
        raise CheckpointFormatError(f"expected a dict of tensors keyed by name; {odd[:3]} are not tensors", path=path)
    return tensors, extra
