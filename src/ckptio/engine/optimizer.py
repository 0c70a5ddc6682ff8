"""Optimizer state through the engine, on one process or many ranks, by parameter name.

Saving: the flat ``{"<param>/<state>": tensor}`` + JSON description of
:mod:`ckptio.state.optimizer` is a state like any other (DTensors stay DTensors), so it gets
the same files from any world size and the same parallel writes as model weights. Layouts
that keep whole tensors in one place (one torch file, ColossalAI's) gather the full state on
the master first (:func:`full_state_dict_on_master`).

Loading: the saved optimizer is matched to the live one (names, groups, shapes) before
anything changes; then each state tensor is read as this rank needs it: the box its parameter
shard covers for a DTensor parameter, whole otherwise (:class:`StateTensorReader`).

Files hold full tensors and no placements, so the load decides how each state tensor of a
DTensor parameter is laid out again (:func:`place_like`): shaped like its parameter, it is
sharded like it; any other shape (Adafactor's ``row_var``, LBFGS's flat ``d`` and history) is
replicated on the parameter's mesh; a 0-dim scalar comes back as a plain tensor. That is
what torch's optimizers themselves build on FSDP2. A save whose DTensor state is laid out
otherwise is refused (:func:`check_restorable_layout`) instead of written and then loaded
into another layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ckptio.engine.group import Group, gather_distinct, peer_failure
from ckptio.engine.reader import DcpFile, TensorFile
from ckptio.engine.tensors import is_dtensor, local_region
from ckptio.errors import CheckpointCorruptError, CheckpointFormatError
from ckptio.layouts import dcp as dcp_layout
from ckptio.layouts.detect import Located
from ckptio.layouts.optimizer import read_saved
from ckptio.state import optimizer as ostate


def flat_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flat state tensors (DTensors stay DTensors) and the JSON description, by name."""
    check_restorable_layout(optimizer)
    names = ostate.param_names(optimizer)
    shapes = [tuple(p.shape) for group in ostate.optimizer_params(optimizer) for p in group]
    return ostate.flatten_optimizer_state(optimizer.state_dict(), names, shapes)


def _layout(t: torch.Tensor) -> tuple | None:
    """``(mesh, placements)`` of a DTensor (``Partial`` read as replicated: it is saved reduced), else None."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor import Partial, Replicate

    return t.device_mesh, tuple(Replicate() if isinstance(p, Partial) else p for p in t.placements)


def _layout_on_load(shape: tuple[int, ...], param: torch.Tensor) -> tuple | None:
    """The layout :func:`place_like` gives a state tensor of ``shape`` that goes with ``param``."""
    if not is_dtensor(param) or len(shape) == 0:
        return None
    if shape == tuple(param.shape):
        return _layout(param)
    from torch.distributed.tensor import Replicate

    return param.device_mesh, (Replicate(),) * param.device_mesh.ndim


def check_restorable_layout(optimizer: torch.optim.Optimizer) -> None:
    """Refuse to save DTensor state that a load would lay out differently (see the module doc).

    The same verdict on every rank: placements are global. Torch's own optimizers on FSDP2 pass
    (Adam's moments are sharded like their parameter, LBFGS's vectors are replicated); e.g.
    LBFGS over a single 1-D parameter keeps a replicated ``d`` of the parameter's shape, which a
    load would shard.
    """
    params = [p for group in ostate.optimizer_params(optimizer) for p in group]
    for i, param in enumerate(params):
        for sname, value in optimizer.state.get(param, {}).items():
            for position, tensor in ostate.iter_tensors(value):
                if not is_dtensor(tensor) or tensor.dim() == 0:
                    continue
                if _layout(tensor) == _layout_on_load(tuple(tensor.shape), param):
                    continue
                names = ostate.param_names(optimizer)
                label = repr(names[i]) if names is not None else f"{i} (positional id)"
                param_layout = f"placed {list(param.placements)}" if is_dtensor(param) else "a plain tensor"
                raise CheckpointFormatError(
                    f"{type(optimizer).__name__} state {ostate.describe_entry(str(sname), position)} of parameter "
                    f"{label} is a DTensor of shape {list(tensor.shape)} placed {list(tensor.placements)}, its "
                    f"parameter has shape {list(param.shape)}, {param_layout}. A load shards state shaped like "
                    "its parameter like the parameter and replicates any other state, so this entry could not "
                    "be restored as it is; nothing was saved"
                )


def full_state_dict_on_master(optimizer: torch.optim.Optimizer, group: Group) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` with full CPU tensors on the master (``None`` elsewhere).

    For layouts that keep whole tensors in one place; DTensors, nested ones too, are
    all-gathered one at a time (a collective on their mesh: every rank calls this, and the
    order is the same on every rank).
    """
    check_restorable_layout(optimizer)
    sd = optimizer.state_dict()

    def full(value: Any) -> Any:
        if is_dtensor(value):
            with peer_failure("gathering optimizer state onto the master"):
                value = value.full_tensor()
        return value.detach().cpu().contiguous() if isinstance(value, torch.Tensor) else value

    state = {
        pid: {sname: ostate.map_tensors(value, full) for sname, value in entries.items()}
        for pid, entries in sd["state"].items()
    }
    return {"state": state, "param_groups": sd["param_groups"]} if group.rank == 0 else None


def place_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The state tensor that goes with ``param`` from its full value: for a DTensor parameter,
    sharded like it when shaped like it, else replicated on its mesh (0-dim: plain)."""
    layout = _layout_on_load(tuple(full.shape), param)
    if layout is None:
        return full
    from torch.distributed.tensor import DTensor, distribute_tensor

    device = param.to_local().device
    if tuple(full.shape) != tuple(param.shape):  # replicated: every rank holds the whole tensor
        mesh, placements = layout
        return DTensor.from_local(full.to(device), mesh, placements, run_check=False)
    region = local_region(param)
    if not region.box:
        return distribute_tensor(full.to(device), param.device_mesh, param.placements, src_data_rank=None)
    local = full[region.index()].to(device).contiguous()
    return DTensor.from_local(
        local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


class StateTensorReader:
    """Resolves a :class:`~ckptio.state.optimizer.TensorRef` of ckptio's layout (or a DCP
    checkpoint's) to what this rank needs: for a DTensor parameter only its box is read from the
    file, else the whole tensor. ``open_file`` opens the file a ``weight_map`` entry names."""

    def __init__(self, folder: Path, weight_map: dict[str, str], open_file=TensorFile) -> None:
        self.folder = folder
        self.weight_map = weight_map
        self.open_file = open_file
        self._open: dict[str, TensorFile] = {}

    def _reader(self, ref: ostate.TensorRef) -> TensorFile:
        name = self.weight_map.get(ref.key)
        if name is None:
            raise CheckpointCorruptError(f"index has no file for state tensor {ref.key!r}", path=self.folder)
        reader = self._open.get(name)
        if reader is None:
            reader = self._open[name] = self.open_file(self.folder / name)
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
            return place_like(reader.read(ref.key), param)
        region = local_region(param)
        if not region.box:
            return place_like(reader.read(ref.key), param)
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


def union_description(description: dict[str, Any], group: Group) -> dict[str, Any]:
    """The description of the whole optimizer when the ranks hold different parameters (pipeline
    stages): every rank's, each distinct one sent once, merged in rank order. Collective."""
    descriptions = gather_distinct(group, "exchanging the optimizers' parameter groups", description)
    distinct = list({id(d): d for d in descriptions}.values())
    return ostate.merge_descriptions(distinct) if len(distinct) > 1 else description


def unheld_parameters(optimizer: torch.optim.Optimizer, located: Located, group: Group) -> list[str]:
    """Saved parameters no rank's optimizer holds (ranks holding different parameters; the same
    list on every rank). Collective."""
    names = ostate.param_names(optimizer) or []
    held = gather_distinct(group, "exchanging the optimizers' parameters", names)
    held_anywhere = {n for per_rank in held for n in per_rank}
    saved, _ = read_saved(located)
    return [p for g in saved.groups for p in g["params"] if p not in held_anywhere]


def prepare_optimizer_load(
    optimizer: torch.optim.Optimizer, located: Located, *, verify: bool = False, partial: bool = False
):
    """Everything a load checks before the optimizer is changed, in any layout: the files, the
    fit of the saved optimizer to the live one (names, groups, shapes), and the state tensors
    this rank needs, read. Returns the ``state_dict`` to hand to :func:`apply_optimizer_load`.
    ``partial``: the optimizer holds some of the saved parameters (a pipeline stage)."""
    if located.layout == "dcp":
        return _prepare_dcp_load(optimizer, located)
    saved, weight_map = read_saved(located, verify=verify)
    names = ostate.param_names(optimizer)
    skeleton, params = ostate.match_saved_to_live(saved, optimizer, names, partial=partial)
    if weight_map is not None:
        reader = StateTensorReader(located.folder, weight_map)
        try:
            ostate.materialize(skeleton, params, reader)
        finally:
            reader.close()
    else:  # whole tensors were read; keep this rank's part of each
        for pid, entries in skeleton["state"].items():
            for sname, value in entries.items():
                entries[sname] = ostate.map_tensors(value, lambda t, p=params[pid]: place_like(t, p))
    return skeleton


def _prepare_dcp_load(optimizer: torch.optim.Optimizer, located: Located) -> dict[str, Any]:
    """A DCP checkpoint's optimizer (:mod:`ckptio.layouts.dcp`), state tensors read box by box."""
    names = ostate.param_names(optimizer)
    sizes = [len(group) for group in ostate.optimizer_params(optimizer)]
    with DcpFile(located.entry_path, all_keys=True) as entries:
        saved = dcp_layout.saved_optimizer(entries.meta, entries.value, names, sizes)
        skeleton, params = ostate.match_saved_to_live(saved, optimizer, names)
        refs = {key: located.entry for key in entries.meta.tensors}
    reader = StateTensorReader(located.folder, refs, lambda path: DcpFile(path, all_keys=True))
    try:
        return ostate.materialize(skeleton, params, reader)
    finally:
        reader.close()


def apply_optimizer_load(optimizer: torch.optim.Optimizer, skeleton: dict[str, Any], where) -> None:
    try:
        optimizer.load_state_dict(skeleton)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointFormatError(f"optimizer refused the loaded state: {exc}", path=where) from exc
