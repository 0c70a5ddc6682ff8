"""Random number generator state of one rank, as JSON (no pickle).

Saved and restored: Python's ``random``, NumPy's global generator, torch's CPU generator,
and every CUDA device's generator when CUDA is available. torch states are ``uint8``
tensors, stored base64-encoded. Restoring them makes dropout, shuffling done with the
global generators and augmentation continue exactly as if the run had never stopped.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from typing import Any

import torch

from ckptio.errors import CheckpointFormatError
from ckptio.formats import naming
from ckptio.formats.versioned import check_versioned

FORMAT = "ckptio-rng"
FORMAT_VERSION = 1
FOLDER = naming.RNG_DIR
rng_file_name = naming.rng_file_name


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text.encode("ascii"), validate=True)), dtype=torch.uint8)


def capture_rng_state(rank: int = 0) -> dict[str, Any]:
    """Every global generator's state (Python, NumPy, torch CPU and every CUDA device), JSON-ready.

    Args:
        rank: recorded in the state, so a file restored on another rank is noticed.
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rank": rank,
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "torch_cpu": _b64(torch.get_rng_state()),
    }
    try:
        import numpy as np
    except ImportError:  # NumPy is optional at run time
        np = None
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "name": name,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def from_generator_states(
    python: Any, numpy_state: Any, torch_cpu: Any, cuda: Any = None, *, path: str | None = None
) -> dict[str, Any]:
    """Our state from the objects the generators themselves hand out (``random.getstate()``,
    ``np.random.get_state()``, ``torch.get_rng_state()``, CUDA states: one tensor or a list),
    as transformers.Trainer and accelerate pickle them; check it with :func:`prepare_rng_restore`."""
    try:
        version, internal, gauss = python
        state: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "python": {"version": version, "state": list(internal), "gauss_next": gauss},
            "torch_cpu": _b64(_byte_tensor(torch_cpu)),
        }
        if numpy_state is not None:
            name, keys, pos, has_gauss, cached = numpy_state
            if getattr(keys, "dtype", None) is None or str(keys.dtype) != "uint32":
                raise TypeError(f"NumPy state keys must be a uint32 array, got {type(keys).__name__}")
            state["numpy"] = {
                "name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            }  # fmt: skip
        if cuda is not None:
            state["torch_cuda"] = [_b64(_byte_tensor(t)) for t in (cuda if isinstance(cuda, list | tuple) else [cuda])]
    except (TypeError, ValueError) as exc:
        raise CheckpointFormatError(f"malformed RNG state: {exc}", path=path) from exc
    return state


def _byte_tensor(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise TypeError(f"a torch RNG state is a uint8 tensor, got {type(value).__name__}")
    return value


def rng_state_bytes(rank: int = 0) -> bytes:
    return (json.dumps(capture_rng_state(rank)) + "\n").encode("utf-8")


def restore_rng_state(state: Any, *, path: str | None = None) -> None:
    """Put every generator back; CUDA states are restored for the devices present.

    Args:
        state: what :func:`capture_rng_state` returned (checked whole before anything moves).
        path: the file it came from, for error messages.
    """
    prepare_rng_restore(state, path=path)()


def prepare_rng_restore(state: Any, *, path: str | None = None) -> Callable[[], None]:
    """Check a saved RNG state completely, changing nothing; returns the call that restores it.

    Each part is tried on a scratch generator first, so a bad file is refused before any
    global generator moves (not after Python's was already reset).
    """
    check_versioned(state, format=FORMAT, max_version=FORMAT_VERSION, what="RNG state file", path=path)
    try:
        py = state["python"]
        python_state = (py["version"], tuple(py["state"]), py["gauss_next"])
        torch_cpu = _from_b64(state["torch_cpu"])
        numpy_saved = state.get("numpy")
        cuda = [_from_b64(s) for s in state.get("torch_cuda", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointFormatError(f"malformed RNG state: {exc!r}", path=path) from exc
    n_cuda = min(len(cuda), torch.cuda.device_count()) if cuda and torch.cuda.is_available() else 0
    numpy_state = None
    try:
        random.Random().setstate(python_state)
        torch.Generator().set_state(torch_cpu)
        if numpy_saved is not None:
            import numpy as np

            numpy_state = (
                numpy_saved["name"],
                np.asarray(numpy_saved["keys"], dtype=np.uint32),
                numpy_saved["pos"],
                numpy_saved["has_gauss"],
                numpy_saved["cached_gaussian"],
            )
            np.random.RandomState().set_state(numpy_state)
        for device in range(n_cuda):
            torch.Generator(device=f"cuda:{device}").set_state(cuda[device])
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointFormatError(f"RNG state cannot be restored: {exc}", path=path) from exc

    def restore() -> None:
        random.setstate(python_state)
        torch.set_rng_state(torch_cpu)
        if numpy_state is not None:
            import numpy as np

            np.random.set_state(numpy_state)
        for device in range(n_cuda):
            torch.cuda.set_rng_state(cuda[device], device)

    return restore
