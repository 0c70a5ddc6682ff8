"""TorchDDPPlugin: data parallel replicas with ``DistributedDataParallel``."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ckptio.checkpoint_io.base import CheckpointIO
from ckptio.checkpoint_io.distributed import DistributedCheckpointIO
from ckptio.plugins.base import Plugin
from ckptio.plugins.process_group import ensure_process_group, local_device


class TorchDDPPlugin(Plugin):
    """Wraps the model in ``DistributedDataParallel`` over ``group``.

    Checkpoints hold each replicated tensor once; the files are split between the ranks by
    bytes and written in parallel, and the master writes the index after a barrier.
    ``ddp_kwargs`` go to ``DistributedDataParallel`` unchanged (``find_unused_parameters``,
    ``bucket_cap_mb``, ...). The process group is the user's when initialised, else one is
    made from ``torchrun``'s environment (gloo on CPU, NCCL on CUDA).

    Args:
        group: the process group to replicate over (None: the default group).
        ddp_kwargs: passed to ``DistributedDataParallel`` unchanged.
    """

    def __init__(self, group: Any = None, **ddp_kwargs: Any) -> None:
        self.group = ensure_process_group(group)
        self.ddp_kwargs = ddp_kwargs
        self._io = DistributedCheckpointIO(self.group)

    def configure(self, model: nn.Module, optimizer: Any, criterion: Any, dataloader: Any, lr_scheduler: Any):
        if not isinstance(model, DistributedDataParallel):
            device = local_device()
            model = model.to(device)
            device_ids = [device.index] if device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids, process_group=self.group, **self.ddp_kwargs)
        return model, optimizer, criterion, dataloader, lr_scheduler

    def get_checkpoint_io(self) -> CheckpointIO:
        return self._io
