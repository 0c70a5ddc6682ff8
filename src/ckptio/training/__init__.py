"""Training checkpoints that resume bit-exactly, with ColossalChat's ``coati.utils.ckpt_io`` API."""

from ckptio.training.checkpoint import load_checkpoint, load_json, save_checkpoint, save_json
from ckptio.training.rng import capture_rng_state, restore_rng_state
from ckptio.training.sampler import StatefulDistributedSampler

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "load_json",
    "save_json",
    "StatefulDistributedSampler",
    "capture_rng_state",
    "restore_rng_state",
]
