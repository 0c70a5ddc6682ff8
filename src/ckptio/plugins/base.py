"""The plugin interface: how a parallel layout wraps objects and which CheckpointIO it uses."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any

from torch import nn

from ckptio.checkpoint_io.base import CheckpointIO


class Plugin(ABC):
    """A parallel layout. ``configure`` wraps the training objects; ``get_checkpoint_io``
    returns the CheckpointIO that knows how this layout's state maps to files.

    Writing a new layout (e.g. tensor parallel): take the process group with
    :func:`ckptio.plugins.process_group.ensure_process_group` in ``__init__``; in
    ``configure`` turn the parameters into DTensors of any placement (any mesh, ``Shard(dim)``
    on any dim, ``Replicate``) and, when parameters are replaced, rebind the user's optimizer
    by name (:func:`ckptio.plugins.fsdp.rebind_optimizer`); return
    :class:`ckptio.checkpoint_io.distributed.DistributedCheckpointIO` from
    ``get_checkpoint_io``. Saving, loading at another world size or layout, and the optimizer
    then need no code of their own: the layout travels with the DTensors.
    """

    @abstractmethod
    def configure(
        self, model: nn.Module, optimizer: Any, criterion: Any, dataloader: Any, lr_scheduler: Any
    ) -> tuple[nn.Module, Any, Any, Any, Any]:
        """Wrap or shard the training objects for this layout (``Booster.boost`` calls it).

        Args:
            model: the model, unwrapped (an already wrapped one is returned as it is).
            optimizer: its optimizer, built on the unwrapped model; rebound by name when the
                parameters are replaced.
            criterion: returned unchanged.
            dataloader: returned unchanged.
            lr_scheduler: returned unchanged.

        Returns:
            ``(model, optimizer, criterion, dataloader, lr_scheduler)``.
        """

    @abstractmethod
    def get_checkpoint_io(self) -> CheckpointIO:
        """The CheckpointIO that saves and loads this layout (collective over its ranks)."""

    def backward(self, loss, optimizer) -> None:
        """Backpropagate ``loss`` (``loss.backward()``: DDP and FSDP2 reduce gradients in hooks).

        Args:
            loss: the scalar loss tensor.
            optimizer: the boosted optimizer (unused here; a layout may need it).
        """
        loss.backward()

    def no_sync(self, model: nn.Module, optimizer: Any = None) -> AbstractContextManager[None]:
        """Gradient accumulation without communication (see :func:`ckptio.plugins.precision.no_sync`).

        Args:
            model: the boosted model whose gradients are not synchronised inside the context.
            optimizer: accepted for ColossalAI's signature; the model's wrapper is what syncs.
        """
        from ckptio.plugins.precision import no_sync

        return no_sync(model)
