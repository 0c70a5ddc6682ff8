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
from ckptio.state_dict import load_state_dict, save_state_dict

__version__ = "0.1.0"

__all__ = [
    "Booster",
    "CheckpointManager",
    "CheckpointIO",
    "GeneralCheckpointIO",
    "LoadReport",
    "load_state_dict",
    "save_state_dict",
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
