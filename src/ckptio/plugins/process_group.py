"""The process group a plugin runs on: the user's, or one made from the environment.

Users usually launch with ``torchrun`` and call ``init_process_group`` themselves; the
plugin then reuses that group. When nothing is initialised, ``torchrun``'s variables
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) are used, and a plain
``python train.py`` gets a world of one (an in-memory store), so the same script runs on a
laptop. Backend: gloo on CPU, NCCL for CUDA tensors (with gloo beside it for CPU objects).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT = timedelta(minutes=10)


def default_backend() -> str:
    """NCCL for CUDA tensors plus gloo for CPU tensors when CUDA is there; gloo otherwise."""
    if torch.cuda.is_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device() -> torch.device:
    """The device this rank computes on: its ``LOCAL_RANK`` GPU, or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def ensure_process_group(group: Any = None, *, backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> Any:
    """Return ``group`` (or the default group), initialising the default group if needed.

    Never re-initialises a group the user made. ``backend`` applies only when ckptio
    initialises the group itself.
    """
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of PyTorch")
    if dist.is_initialized():
        return group if group is not None else dist.group.WORLD
    if group is not None:
        raise ValueError("a process group was passed but torch.distributed is not initialised")
    backend = backend or default_backend()
    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    else:
        store = dist.HashStore()
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
    return dist.group.WORLD
