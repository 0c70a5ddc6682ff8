"""ckptio: fast, crash-safe, Hugging Face-compatible checkpoints for PyTorch training jobs."""

from ckptio.booster import Booster
from ckptio.checkpoint_io.base import CheckpointIO
from ckptio.checkpoint_io.general import GeneralCheckpointIO
from ckptio.cluster import DistCoordinator
from ckptio.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    DistributedCheckpointError,
    StateMismatchError,
    UnsafeCheckpointError,
)
from ckptio.manager import CheckpointManager
from ckptio.state.report import LoadReport

__version__ = "0.1.0"

__all__ = [
    "Booster",
    "CheckpointManager",
    "CheckpointIO",
    "GeneralCheckpointIO",
    "LoadReport",
    "DistCoordinator",
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointExistsError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "DistributedCheckpointError",
    "StateMismatchError",
    "UnsafeCheckpointError",
]
