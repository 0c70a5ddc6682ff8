"""Async saves: snapshot into reusable host buffers, then write and commit in the background."""

from ckptio.async_io.staging import StagingBuffers
from ckptio.async_io.writer import AsyncSaver

__all__ = ["AsyncSaver", "StagingBuffers"]
