"""``LightningCheckpointIO``: Lightning's checkpoints saved and loaded by ckptio.

::

    from lightning import Trainer
    from ckptio.integrations.lightning import LightningCheckpointIO

    trainer = Trainer(plugins=[LightningCheckpointIO()])       # use_async=True: save in the background
    trainer.fit(model, ckpt_path="last")

Each checkpoint (``last.ckpt`` too) is a folder committed atomically, with a manifest: the
LightningModule's weights as safetensors shards, the other tensors likewise, the rest as JSON
(:mod:`ckptio.integrations.lightning_format`). Nothing is pickled, so loads are
``weights_only=True`` whatever is asked; ``.ckpt`` files written before the switch still load
through Lightning's own loader. For the ``pytorch_lightning`` package, import the class from
:mod:`ckptio.integrations.pytorch_lightning`.
"""

from __future__ import annotations

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ckptio.integrations.lightning_format import LightningCheckpointIOBase


class LightningCheckpointIO(LightningCheckpointIOBase, CheckpointIO):
    __doc__ = LightningCheckpointIOBase.__doc__
    _torch_checkpoint_io = TorchCheckpointIO


__all__ = ["LightningCheckpointIO"]
