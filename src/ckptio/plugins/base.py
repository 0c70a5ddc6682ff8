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
    ) -> tuple[nn.Module, Any, Any, Any, Any]: ...

    @abstractmethod
    def get_checkpoint_io(self) -> CheckpointIO: ...

    def backward(self, loss, optimizer) -> None:
        loss.backward()

    def no_sync(self, model: nn.Module, optimizer: Any = None) -> AbstractContextManager[None]:
        """Gradient accumulation without communication (see :func:`ckptio.plugins.precision.no_sync`).

        ``optimizer`` is accepted for ColossalAI's signature; the model's wrapper is what syncs."""
        from ckptio.plugins.precision import no_sync

        return no_sync(model)
