"""Parallel layouts: each wraps the training objects and brings its own CheckpointIO."""

from ckptio.plugins.base import Plugin
from ckptio.plugins.ddp import TorchDDPPlugin
from ckptio.plugins.fsdp import TorchFSDPPlugin
from ckptio.plugins.hybrid import HybridParallelPlugin
from ckptio.plugins.zero import GeminiPlugin, LowLevelZeroPlugin

__all__ = ["GeminiPlugin", "HybridParallelPlugin", "LowLevelZeroPlugin", "Plugin", "TorchDDPPlugin", "TorchFSDPPlugin"]
