"""Booster: the user-facing entry point, with ColossalAI's method names and defaults."""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from torch.optim import Optimizer

from ckptio.checkpoint_io.base import CheckpointIO
from ckptio.checkpoint_io.general import GeneralCheckpointIO
from ckptio.plugins.base import Plugin
from ckptio.state.optimizer import register_model
from ckptio.state.report import LoadReport

PathLike = str | os.PathLike


class Booster:
    """Wraps training objects for a parallel layout and saves/loads their state.

    Without a plugin, ``boost`` returns the objects unchanged and checkpoints are written by
    one process (the usual single-GPU or hand-made data parallel case).
    """

    def __init__(self, device: str | None = None, mixed_precision: Any = None, plugin: Plugin | None = None) -> None:
        if mixed_precision is not None:
            raise NotImplementedError("ckptio's Booster does not manage mixed precision; use torch.autocast")
        self.device = device
        self.plugin = plugin
        self.checkpoint_io: CheckpointIO = plugin.get_checkpoint_io() if plugin is not None else GeneralCheckpointIO()

    def boost(
        self,
        model: nn.Module,
        optimizer: Optimizer | None = None,
        criterion: Any = None,
        dataloader: Any = None,
        lr_scheduler: Any = None,
    ) -> tuple[nn.Module, Optimizer | None, Any, Any, Any]:
        """Return ``(model, optimizer, criterion, dataloader, lr_scheduler)``, wrapped for the plugin."""
        if self.plugin is not None:
            model, optimizer, criterion, dataloader, lr_scheduler = self.plugin.configure(
                model, optimizer, criterion, dataloader, lr_scheduler
            )
        if optimizer is not None and model is not None:
            register_model(optimizer, model)  # optimizer state is then saved by parameter name
        return model, optimizer, criterion, dataloader, lr_scheduler

    def backward(self, loss, optimizer: Optimizer | None = None) -> None:
        if self.plugin is None:
            loss.backward()
        else:
            self.plugin.backward(loss, optimizer)

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
        """Save model weights (see :meth:`CheckpointIO.save_model`)."""
        self.checkpoint_io.save_model(
            model, checkpoint, shard, gather_dtensor, prefix, size_per_shard, use_safetensors, use_async
        )

    def load_model(
        self,
        model: nn.Module,
        checkpoint: PathLike,
        strict: bool = True,
        low_cpu_mem_mode: bool = True,
        num_threads: int = 1,
        verify: bool = False,
    ) -> LoadReport:
        """Load model weights in any supported layout (see :meth:`CheckpointIO.load_model`)."""
        self.checkpoint_io.load_model(model, checkpoint, strict, low_cpu_mem_mode, num_threads, verify)
        return self.checkpoint_io.last_load_report

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
        """Save optimizer state (see :meth:`CheckpointIO.save_optimizer`)."""
        self.checkpoint_io.save_optimizer(
            optimizer, checkpoint, shard, gather_dtensor, prefix, size_per_shard, use_async
        )

    def load_optimizer(
        self,
        optimizer: Optimizer,
        checkpoint: PathLike,
        low_cpu_mem_mode: bool = True,
        num_threads: int = 1,
        verify: bool = False,
    ) -> None:
        """Load optimizer state (see :meth:`CheckpointIO.load_optimizer`)."""
        self.checkpoint_io.load_optimizer(optimizer, checkpoint, low_cpu_mem_mode, num_threads, verify)

    def save_lr_scheduler(self, lr_scheduler: Any, checkpoint: PathLike) -> None:
        """Save an LR scheduler's state."""
        self.checkpoint_io.save_lr_scheduler(lr_scheduler, checkpoint)

    def load_lr_scheduler(self, lr_scheduler: Any, checkpoint: PathLike) -> None:
        """Load an LR scheduler's state."""
        self.checkpoint_io.load_lr_scheduler(lr_scheduler, checkpoint)

    def wait(self) -> None:
        """Block until every async save of this booster is durable; re-raise its error."""
        self.checkpoint_io.wait()
