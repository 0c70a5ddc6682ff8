"""Parallel layouts: each wraps the training objects and brings its own CheckpointIO."""

from ckptio.plugins.base import Plugin
from ckptio.plugins.ddp import TorchDDPPlugin
from ckptio.plugins.fsdp import TorchFSDPPlugin
from ckptio.plugins.hybrid import HybridParallelPlugin

__all__ = ["HybridParallelPlugin", "Plugin", "TorchDDPPlugin", "TorchFSDPPlugin"]
