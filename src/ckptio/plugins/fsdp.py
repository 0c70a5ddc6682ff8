"""TorchFSDPPlugin: FSDP2 (``fully_shard``) over a one-dimensional ``DeviceMesh``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ckptio.checkpoint_io.base import CheckpointIO
from ckptio.checkpoint_io.distributed import DistributedCheckpointIO
from ckptio.plugins.base import Plugin
from ckptio.plugins.process_group import device_type, ensure_process_group, local_device


def default_shard_classes(model: nn.Module) -> set[str]:
    """Class names to shard one by one: a ``transformers`` model's ``_no_split_modules``
    (its decoder layers), else nothing (the whole model is one FSDP unit)."""
    return set(getattr(model, "_no_split_modules", None) or ())


def rebind_optimizer(
    optimizer: torch.optim.Optimizer, old_names: dict[int, str], model: nn.Module, *, drop_absent: bool = False
) -> None:
    """Point every param group at the model's current (sharded) parameters, in place.

    Users build the optimizer on the unsharded model; ``fully_shard`` replaces the
    parameters, so the groups are rewritten by parameter name, keeping every setting.
    ``drop_absent``: parameters the model no longer holds (another pipeline stage's) leave
    their group (which stays, maybe empty: every stage keeps the same groups).
    """
    if any(optimizer.state.values()):
        raise ValueError(
            "the optimizer already has state (it has stepped); boost() it before the first optimizer.step()"
        )
    current = dict(model.named_parameters(remove_duplicate=False))
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            name = old_names.get(id(p))
            if drop_absent and name is not None and name not in current:
                continue
            if name is None or name not in current:
                raise ValueError("the optimizer holds a parameter that is not part of the boosted model")
            params.append(current[name])
        group["params"][:] = params  # the same list: LBFGS keeps a reference to it
    optimizer.state.clear()


class TorchFSDPPlugin(Plugin):
    """Shards parameters, gradients and optimizer state with FSDP2 over ``mesh``.

    Args:
        mesh: the ``DeviceMesh`` to shard over; by default a 1-D one over every rank of
            ``group`` (a ``'cpu'`` mesh with gloo when there is no GPU). A 2-D mesh gives HSDP;
            checkpoints are then saved by every rank of the default group.
        group: the process group when ``mesh`` is not given (default: the default group).
        shard_classes: class names of the submodules that become their own FSDP unit
            (default: :func:`default_shard_classes`); the root is always sharded last.
        shard_fn: instead of ``shard_classes``, a function ``(module, mesh) -> None`` that
            applies ``fully_shard`` the way the user wants (the root is still sharded).
        fsdp_kwargs: passed to every ``fully_shard`` call (``reshard_after_forward``,
            ``mp_policy``, ...).

    Checkpoints are ordinary Hugging Face folders: each full tensor is written by one owner
    rank (balanced by bytes) and loads on any number of ranks.
    """

    def __init__(
        self,
        mesh: Any = None,
        group: Any = None,
        shard_classes: Iterable[str] | None = None,
        shard_fn: Callable[[nn.Module, Any], None] | None = None,
        **fsdp_kwargs: Any,
    ) -> None:
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        self.group = ensure_process_group(group if mesh is None else None)
        local_device()  # binds this rank's GPU before the mesh is built (a no-op on CPU)
        if mesh is None:
            if group is None:
                world = torch.distributed.get_world_size()
                mesh = init_device_mesh(device_type(), (world,))
            else:
                mesh = DeviceMesh.from_group(group, device_type())
        elif mesh.ndim == 1:
            self.group = mesh.get_group()
        self.mesh = mesh
        self.shard_classes = None if shard_classes is None else set(shard_classes)
        self.shard_fn = shard_fn
        self.fsdp_kwargs = fsdp_kwargs
        self._io = DistributedCheckpointIO(self.group)

    def shard_model(self, model: nn.Module) -> nn.Module:
        """Apply ``fully_shard`` to the chosen submodules, then to the root.

        Args:
            model: the model on this rank's device; sharded in place and returned.
        """
        from torch.distributed.fsdp import fully_shard

        if self.shard_fn is not None:
            self.shard_fn(model, self.mesh)
        else:
            classes = self.shard_classes if self.shard_classes is not None else default_shard_classes(model)
            for module in list(model.modules())[1:]:
                if type(module).__name__ in classes:
                    fully_shard(module, mesh=self.mesh, **self.fsdp_kwargs)
        fully_shard(model, mesh=self.mesh, **self.fsdp_kwargs)
        return model

    def configure(self, model: nn.Module, optimizer: Any, criterion: Any, dataloader: Any, lr_scheduler: Any):
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule):
            old_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
            model = self.shard_model(model.to(local_device()))
            if optimizer is not None:
                rebind_optimizer(optimizer, old_names, model)
        return model, optimizer, criterion, dataloader, lr_scheduler

    def get_checkpoint_io(self) -> CheckpointIO:
        return self._io
