"""Parallel layouts: each wraps the training objects and brings its own CheckpointIO."""

from ckptio.plugins.base import Plugin

__all__ = ["Plugin"]
