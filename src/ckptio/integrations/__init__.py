"""ckptio inside other training frameworks.

* :mod:`ckptio.integrations.lightning`: ``LightningCheckpointIO``, a ``CheckpointIO`` plugin for
  ``lightning`` (``Trainer(plugins=[LightningCheckpointIO()])``);
  :mod:`ckptio.integrations.pytorch_lightning` is the same for the ``pytorch_lightning`` package.

Each module imports its framework; this package imports none.
"""
