"""The CheckpointIO contract behind ``Booster.save_* / load_*``.

Public methods take ColossalAI's argument names and defaults, validate them once, and call
the ``_``-prefixed hooks that each plugin's CheckpointIO overrides. Every rank calls every
public method (they are collective in distributed plugins).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

from torch import nn
from torch.optim import Optimizer

from ckptio.checkpoint_io.model_files import MiB, ModelSaveOptions
from ckptio.checkpoint_io.model_state import LoadReport
from ckptio.formats.naming import check_prefix

PathLike = str | os.PathLike


def _check_size_per_shard(size_per_shard: float) -> int:
    if isinstance(size_per_shard, bool) or not isinstance(size_per_shard, int | float) or size_per_shard <= 0:
        raise ValueError(f"size_per_shard is in MiB and must be a positive number, got {size_per_shard!r}")
    return max(1, int(size_per_shard * MiB))


def _check_path(checkpoint: PathLike) -> str:
    if not isinstance(checkpoint, str | os.PathLike) or not os.fspath(checkpoint):
        raise TypeError(f"checkpoint must be a non-empty path, got {checkpoint!r}")
    return os.fspath(checkpoint)


class CheckpointIO(ABC):
    """Saves and loads model, optimizer and LR scheduler state for one parallel layout."""

    # ------------------------------------------------------------------ model
    def save_model(
        self,
        model: nn.Module,
        checkpoint: PathLike,
        shard: bool = False,
        gather_dtensor: bool = True,
        prefix: str | None = None,
        size_per_shard: int = 1024,
        use_safetensors: bool = False,
        use_async: bool = False,
    ) -> None:
        """Save model weights: one file at ``checkpoint``, or (``shard=True``) a folder of
        shards of at most ``size_per_shard`` MiB with a Hugging Face index."""
        opts = ModelSaveOptions(
            shard=bool(shard),
            prefix=check_prefix(prefix),
            max_shard_bytes=_check_size_per_shard(size_per_shard),
            use_safetensors=bool(use_safetensors),
        )
        self._save_model(model, _check_path(checkpoint), opts, gather_dtensor=gather_dtensor, use_async=use_async)

    def load_model(
        self,
        model: nn.Module,
        checkpoint: PathLike,
        strict: bool = True,
        low_cpu_mem_mode: bool = True,
        num_threads: int = 1,
        verify: bool = False,
    ) -> LoadReport:
        """Load weights saved in any supported layout into ``model`` in place.

        Returns the report of missing / unexpected / mismatched keys (empty when all fit);
        with ``strict=True`` a non-empty report raises instead, before anything is loaded.
        """
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
        return self._load_model(
            model,
            _check_path(checkpoint),
            strict=bool(strict),
            low_cpu_mem_mode=bool(low_cpu_mem_mode),
            num_threads=num_threads,
            verify=bool(verify),
        )

    # ------------------------------------------------------------------ optimizer
    def save_optimizer(
        self,
        optimizer: Optimizer,
        checkpoint: PathLike,
        shard: bool = False,
        gather_dtensor: bool = True,
        prefix: str | None = None,
        size_per_shard: int = 1024,
        use_async: bool = False,
    ) -> None:
        """Save optimizer state: one file, or (``shard=True``) a folder of shards."""
        self._save_optimizer(
            optimizer,
            _check_path(checkpoint),
            shard=bool(shard),
            gather_dtensor=gather_dtensor,
            prefix=check_prefix(prefix),
            max_shard_bytes=_check_size_per_shard(size_per_shard),
            use_async=use_async,
        )

    def load_optimizer(
        self,
        optimizer: Optimizer,
        checkpoint: PathLike,
        low_cpu_mem_mode: bool = True,
        num_threads: int = 1,
        verify: bool = False,
    ) -> None:
        """Load optimizer state saved in any supported layout into ``optimizer``."""
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
        self._load_optimizer(
            optimizer,
            _check_path(checkpoint),
            low_cpu_mem_mode=bool(low_cpu_mem_mode),
            num_threads=num_threads,
            verify=bool(verify),
        )

    # ------------------------------------------------------------------ lr scheduler
    def save_lr_scheduler(self, lr_scheduler: Any, checkpoint: PathLike) -> None:
        """Save an LR scheduler's ``state_dict()`` (JSON when every value allows)."""
        self._save_lr_scheduler(lr_scheduler, _check_path(checkpoint))

    def load_lr_scheduler(self, lr_scheduler: Any, checkpoint: PathLike) -> None:
        """Load an LR scheduler's state saved by ckptio or ColossalAI."""
        self._load_lr_scheduler(lr_scheduler, _check_path(checkpoint))

    # ------------------------------------------------------------------ async
    def wait(self) -> None:
        """Block until every async save started by this object is durable; re-raise its error."""
        return None

    # ------------------------------------------------------------------ hooks
    @abstractmethod
    def _save_model(self, model, checkpoint: str, opts: ModelSaveOptions, *, gather_dtensor, use_async) -> None: ...

    @abstractmethod
    def _load_model(self, model, checkpoint: str, *, strict, low_cpu_mem_mode, num_threads, verify) -> LoadReport: ...

    def _save_optimizer(self, optimizer, checkpoint: str, **kwargs) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot save optimizers yet")

    def _load_optimizer(self, optimizer, checkpoint: str, **kwargs) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot load optimizers yet")

    def _save_lr_scheduler(self, lr_scheduler, checkpoint: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot save LR schedulers yet")

    def _load_lr_scheduler(self, lr_scheduler, checkpoint: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot load LR schedulers yet")
