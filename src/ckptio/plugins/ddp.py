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

    Checkpoints hold each replicated tensor once (the files one process writes, split between
    the ranks by bytes); a load reads each tensor on one rank and broadcasts it.
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
        release_group_after_reducer(model)
        return model, optimizer, criterion, dataloader, lr_scheduler

    def get_checkpoint_io(self) -> CheckpointIO:
        return self._io


_GROUP_KEEPALIVE = "_ckptio_process_group"


class _GroupKeepalive:
    """Holds a process group; pickles and copies as an empty holder, since DDP's own pickling
    leaves its group out too (an unpickled DDP module builds a new reducer on the default group)."""

    __slots__ = ("group",)

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_GroupKeepalive, ())


def release_group_after_reducer(model: DistributedDataParallel) -> None:
    """Make a Python reference, dropped after the reducer's, the last one to ``model``'s process group.

    Works around a torch deadlock at teardown (issue 17, item 9): when DDP's C++ reducer holds the
    last reference to a gloo group, the module's deallocation destroys the group inside the
    reducer's destructor with the GIL held, and ``~ProcessGroupGloo`` joins gloo's worker threads;
    a worker still releasing its last finished collective needs the GIL to free the Python
    objects that collective held, so the rank never exits (seen after ``destroy_process_group()``
    in about 1 round in 7 on a loaded 2-core machine, with or without ckptio's collectives). A
    Python reference dies through the group's own Python object, whose destructor releases the
    GIL first. An attribute set after ``__init__`` is torn down after ``reducer`` and ``logger``
    (CPython frees instance attributes in the order they were first set).
    """
    group = getattr(model, "process_group", None)
    if group is not None:
        model.__dict__[_GROUP_KEEPALIVE] = _GroupKeepalive(group)
