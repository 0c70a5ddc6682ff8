"""The plugin interface: how a parallel layout wraps objects and which CheckpointIO it uses."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import nn

from ckptio.checkpoint_io.base import CheckpointIO


class Plugin(ABC):
    """A parallel layout. ``configure`` wraps the training objects; ``get_checkpoint_io``
    returns the CheckpointIO that knows how this layout's state maps to files."""

    @abstractmethod
    def configure(
        self, model: nn.Module, optimizer: Any, criterion: Any, dataloader: Any, lr_scheduler: Any
    ) -> tuple[nn.Module, Any, Any, Any, Any]: ...

    @abstractmethod
    def get_checkpoint_io(self) -> CheckpointIO: ...

    def backward(self, loss, optimizer) -> None:
        loss.backward()
