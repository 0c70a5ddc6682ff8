"""``LightningCheckpointIO`` for the ``pytorch_lightning`` package (``lightning_fabric``'s
``CheckpointIO``); the same plugin as :mod:`ckptio.integrations.lightning`, for
``pytorch_lightning.Trainer(plugins=[LightningCheckpointIO()])``."""

from __future__ import annotations

from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ckptio.integrations.lightning_format import LightningCheckpointIOBase


class LightningCheckpointIO(LightningCheckpointIOBase, CheckpointIO):
    __doc__ = LightningCheckpointIOBase.__doc__
    _torch_checkpoint_io = TorchCheckpointIO


__all__ = ["LightningCheckpointIO"]
