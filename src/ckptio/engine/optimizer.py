"""Optimizer state through the engine, on one process or many ranks, by parameter name.

Saving: the flat ``{"<param>/<state>": tensor}`` + JSON description of
:mod:`ckptio.state.optimizer` is a state like any other (DTensors stay DTensors), so it gets
the same files from any world size and the same parallel writes as model weights. Layouts
that keep whole tensors in one place (one torch file, ColossalAI's) gather the full state on
the master first (:func:`full_state_dict_on_master`).

Loading: the saved optimizer is matched to the live one (names, groups, shapes) before
anything changes; then each state tensor is read as this rank needs it: the box its parameter
shard covers for a DTensor parameter, whole otherwise (:class:`StateTensorReader`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ckptio.engine.group import Group, peer_failure
from ckptio.engine.reader import TensorFile
from ckptio.engine.tensors import is_dtensor, local_region
from ckptio.errors import CheckpointCorruptError, CheckpointFormatError
from ckptio.layouts.detect import Located
from ckptio.layouts.optimizer import read_saved
from ckptio.state import optimizer as ostate


def flat_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flat state tensors (DTensors stay DTensors) and the JSON description, by name."""
    names = ostate.param_names(optimizer)
    shapes = [tuple(p.shape) for group in ostate.optimizer_params(optimizer) for p in group]
    return ostate.flatten_optimizer_state(optimizer.state_dict(), names, shapes)


def full_state_dict_on_master(optimizer: torch.optim.Optimizer, group: Group) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` with full CPU tensors on the master (``None`` elsewhere).

    For layouts that keep whole tensors in one place; DTensors are all-gathered one at a time
    (a collective on their mesh: every rank calls this).
    """
    sd = optimizer.state_dict()
    state: dict[Any, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():  # the same order on every rank
        out = {}
        for sname, value in entries.items():
            if is_dtensor(value):
                with peer_failure("gathering optimizer state onto the master"):
                    value = value.full_tensor()
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().contiguous()
            out[sname] = value
        state[pid] = out
    return {"state": state, "param_groups": sd["param_groups"]} if group.rank == 0 else None


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of a full state tensor that goes with ``param``'s shard, as a DTensor laid
    out like ``param`` (state tensors of elementwise optimizers have the parameter's shape)."""
    if not is_dtensor(param) or tuple(full.shape) != tuple(param.shape):
        return full
    from torch.distributed.tensor import DTensor, distribute_tensor

    region = local_region(param)
    device = param.to_local().device
    if not region.box:
        return distribute_tensor(full.to(device), param.device_mesh, param.placements, src_data_rank=None)
    local = full[region.index()].to(device).contiguous() if full.dim() else full.to(device)
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


class StateTensorReader:
    """Resolves a :class:`~ckptio.state.optimizer.TensorRef` of ckptio's layout to what this rank
    needs: for a DTensor parameter only its box is read from the file, else the whole tensor."""

    def __init__(self, folder: Path, weight_map: dict[str, str]) -> None:
        self.folder = folder
        self.weight_map = weight_map
        self._open: dict[str, TensorFile] = {}

    def _reader(self, ref: ostate.TensorRef) -> TensorFile:
        name = self.weight_map.get(ref.key)
        if name is None:
            raise CheckpointCorruptError(f"index has no file for state tensor {ref.key!r}", path=self.folder)
        reader = self._open.get(name)
        if reader is None:
            reader = self._open[name] = TensorFile(self.folder / name)
        found = reader.shapes().get(ref.key)
        if found is None or found[0] != ref.dtype or tuple(found[1]) != ref.shape:
            raise CheckpointCorruptError(
                f"state tensor {ref.key!r} is missing or differs from the index ({ref.dtype}{list(ref.shape)})",
                path=self.folder / name,
            )
        return reader

    def __call__(self, ref: ostate.TensorRef, param: torch.Tensor) -> torch.Tensor:
        reader = self._reader(ref)
        if not is_dtensor(param) or ref.shape != tuple(param.shape):
            return reader.read(ref.key)
        region = local_region(param)
        if not region.box:
            return shard_like(reader.read(ref.key), param)
        from torch.distributed.tensor import DTensor

        local = torch.empty(region.shape, dtype=ref.dtype)
        if region.numel:
            reader.read_box(ref.key, region, local)
        local = local.to(param.to_local().device)
        return DTensor.from_local(
            local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()


def prepare_optimizer_load(optimizer: torch.optim.Optimizer, located: Located, *, verify: bool = False):
    """Everything a load checks before the optimizer is changed, in any layout: the files, the
    fit of the saved optimizer to the live one (names, groups, shapes), and the state tensors
    this rank needs, read. Returns the ``state_dict`` to hand to :func:`apply_optimizer_load`."""
    saved, weight_map = read_saved(located, verify=verify)
    skeleton, params = ostate.match_saved_to_live(saved, optimizer, ostate.param_names(optimizer))
    if weight_map is not None:
        reader = StateTensorReader(located.folder, weight_map)
        try:
            ostate.materialize(skeleton, params, reader)
        finally:
            reader.close()
    else:  # whole tensors were read; keep this rank's part of each
        for pid, entries in skeleton["state"].items():
            for sname, value in entries.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    entries[sname] = shard_like(value, params[pid])
    return skeleton


def apply_optimizer_load(optimizer: torch.optim.Optimizer, skeleton: dict[str, Any], where) -> None:
    try:
        optimizer.load_state_dict(skeleton)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointFormatError(f"optimizer refused the loaded state: {exc}", path=where) from exc
