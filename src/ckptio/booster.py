"""Booster: the user-facing entry point, with ColossalAI's method names and defaults."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ckptio.async_io.writer import SaveHandle
from ckptio.checkpoint_io.base import CheckpointIO
from ckptio.checkpoint_io.general import GeneralCheckpointIO
from ckptio.plugins.base import Plugin
from ckptio.plugins.process_group import device_type
from ckptio.state.optimizer import register_model
from ckptio.state.report import KeyMap, LoadReport

PathLike = str | os.PathLike


class Booster:
    """Wraps training objects for a parallel layout and saves/loads their state.

    Without a plugin, ``boost`` returns the objects unchanged (the model moved to ``device``
    when given) and checkpoints are written by one process (the usual single-GPU or hand-made
    data parallel case).
    """

    def __init__(self, device: str | None = None, mixed_precision: Any = None, plugin: Plugin | None = None) -> None:
        if mixed_precision is not None:
            raise _mixed_precision_error(mixed_precision, plugin)
        if device is not None and plugin is not None and torch.device(device).type != device_type():
            raise ValueError(
                f"Booster(device={device!r}) with a plugin: {type(plugin).__name__} places the model on this "
                f"rank's device ({device_type()}: its LOCAL_RANK GPU, or the CPU); drop device="
            )
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
        """Return ``(model, optimizer, criterion, dataloader, lr_scheduler)``, wrapped for the plugin.

        Without a plugin, ``Booster(device=...)`` moves the model there; an optimizer built on it
        is pointed at the moved parameters (by name) where the move replaced them."""
        if self.plugin is None and self.device is not None and model is not None:
            model = _move(model, optimizer, self.device)
        if self.plugin is not None:
            model, optimizer, criterion, dataloader, lr_scheduler = self.plugin.configure(
                model, optimizer, criterion, dataloader, lr_scheduler
            )
        if optimizer is not None and model is not None:
            register_model(optimizer, model)  # optimizer state is then saved by parameter name
        # an async save's copy runs behind the loop: the optimizer's step and the model's forward
        # wait for the copy of what they modify (and only for that)
        self.checkpoint_io.guard(model, optimizer)
        return model, optimizer, criterion, dataloader, lr_scheduler

    def backward(self, loss, optimizer: Optimizer | None = None) -> None:
        if self.plugin is None:
            loss.backward()
        else:
            self.plugin.backward(loss, optimizer)

    def no_sync(
        self, model: nn.Module | None = None, optimizer: Optimizer | None = None
    ) -> AbstractContextManager[None]:
        """A context in which ``backward()`` accumulates gradients without synchronising them
        (gradient accumulation); the first ``backward()`` after it synchronises.

        DDP: ``model.no_sync()``; FSDP2 (TorchFSDPPlugin, LowLevelZeroPlugin, GeminiPlugin,
        HybridParallelPlugin): ``model.set_requires_gradient_sync(False)`` until the context ends.
        ``optimizer`` is accepted for ColossalAI's signature: the model's wrapper is what syncs.
        Without a plugin a plain model has nothing to synchronise (a DDP or FSDP2 model made by
        hand gets the same treatment as under a plugin)."""
        if self.plugin is not None:
            return self.plugin.no_sync(model, optimizer)
        from ckptio.plugins.precision import no_sync

        return no_sync(model, wrapped=False)

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
    ) -> SaveHandle:
        """Save model weights (see :meth:`CheckpointIO.save_model`).

        ``use_async=True`` returns before the state is copied: the boosted optimizer's ``step()``
        and the boosted model's forward wait for the copy of what they modify; anything else
        that changes the state in place calls :meth:`wait_staged` first. Returns a handle:
        ``handle.staged.wait()`` (the state may change), ``handle.durable.wait()`` (committed).
        """
        return self.checkpoint_io.save_model(
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
        *,
        key_map: KeyMap | None = None,
        allow_dtype_cast: bool = True,
    ) -> LoadReport:
        """Load model weights in any supported layout (see :meth:`CheckpointIO.load_model`).

        ``key_map`` (a dict, or a function from checkpoint key to model key; None drops the key)
        loads part of a checkpoint or renames its keys; tensors of another dtype are cast unless
        ``allow_dtype_cast=False``. Both are described in :meth:`CheckpointIO.load_model`.
        """
        return self.checkpoint_io.load_model(
            model, checkpoint, strict, low_cpu_mem_mode, num_threads, verify,
            key_map=key_map, allow_dtype_cast=allow_dtype_cast,
        )  # fmt: skip

    def save_optimizer(
        self,
        optimizer: Optimizer,
        checkpoint: PathLike,
        shard: bool = False,
        gather_dtensor: bool = True,
        prefix: str | None = None,
        size_per_shard: int = 1024,
        use_async: bool = False,
    ) -> SaveHandle:
        """Save optimizer state (see :meth:`CheckpointIO.save_optimizer`); returns a handle as :meth:`save_model`."""
        return self.checkpoint_io.save_optimizer(
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

    def wait_staged(self) -> None:
        """Block until the async save in flight has copied the state: call it before changing the
        state in place other than through the boosted optimizer's ``step()`` or the boosted
        model's forward (``model.load_state_dict``, ``p.data.copy_``, an EMA update, a ``stateful=``
        object's tensors). Never raises: a failed save raises from the next save or :meth:`wait`."""
        self.checkpoint_io.wait_staged()


def _mixed_precision_error(mixed_precision: Any, plugin: Plugin | None) -> Exception:
    """Why ``Booster(mixed_precision=...)`` is refused, and what to do instead."""
    if plugin is not None and hasattr(plugin, "precision"):
        return ValueError(
            f"Booster(mixed_precision={mixed_precision!r}): {type(plugin).__name__} sets the precision itself; "
            f"pass precision='bf16' to {type(plugin).__name__}(...) and drop mixed_precision="
        )
    return NotImplementedError(
        f"Booster(mixed_precision={mixed_precision!r}) is not supported: ckptio does not wrap the model or "
        "optimizer for mixed precision. Use precision='bf16' of LowLevelZeroPlugin, GeminiPlugin or "
        "HybridParallelPlugin (bf16 compute, fp32 master weights), or run the forward pass under "
        "torch.autocast(device_type, dtype=torch.bfloat16); for fp16 add torch.amp.GradScaler around backward "
        "and optimizer.step()"
    )


def _move(model: nn.Module, optimizer: Optimizer | None, device: str) -> nn.Module:
    """``model.to(device)``; a move that replaces parameter objects (e.g. to another kind of
    tensor) rebinds the optimizer built on the old ones, by name."""
    from ckptio.plugins.fsdp import rebind_optimizer

    old_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    model = model.to(device)
    if optimizer is not None and any(id(p) not in old_names for p in model.parameters()):
        rebind_optimizer(optimizer, old_names, model)
    return model
