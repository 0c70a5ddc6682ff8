"""Optimizer state across ranks, by parameter name.

The flat ``{"<param>/<state>": tensor}`` + JSON description of
:mod:`ckptio.checkpoint_io.optimizer_state` goes through the same multi-rank engine as
model weights: sharded state (FSDP2's DTensor ``exp_avg``...) is written by owner ranks in
the same files a single process writes (``optimizer-0000k-of-0000n.safetensors`` +
``optimizer.index.json``), so it loads at another world size or into a plain optimizer.
Loading matches saved and live parameters by name, then each rank reads only the box of
each state tensor that its parameter shard covers.

Files hold full tensors and no placements, so the load decides how each state tensor of a
DTensor parameter is laid out again (:func:`place_like`): shaped like its parameter, it is
sharded like it; any other shape (Adafactor's ``row_var``, LBFGS's flat ``d`` and history) is
replicated on the parameter's mesh; a 0-dim scalar comes back as a plain tensor. That is
what torch's optimizers themselves build on FSDP2. A save whose DTensor state is laid out
otherwise is refused (:func:`check_restorable_layout`) instead of written and then loaded
into another layout.
"""

from __future__ import annotations

from typing import Any

import torch

from ckptio.checkpoint_io import optimizer_files as ofiles
from ckptio.checkpoint_io import optimizer_state as ostate
from ckptio.checkpoint_io.distributed_state import WriteSpec, write_state
from ckptio.checkpoint_io.distributed_tensors import BoxReader, is_dtensor, local_region
from ckptio.checkpoint_io.model_files import ModelFilePlan
from ckptio.errors import CheckpointCorruptError, CheckpointFormatError
from ckptio.formats import colossal_optim, torch_format
from ckptio.formats.hf_index import read_index
from ckptio.planning.collectives import Group, collective_step, peer_failure
from ckptio.planning.plan import OwnedFilePlan
from ckptio.storage import atomic
from ckptio.storage.base import FileRecord, FileWriter


def has_dtensor_state(optimizer: torch.optim.Optimizer) -> bool:
    return any(is_dtensor(v) for entries in optimizer.state.values() for v in entries.values())


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


def index_writer(description: dict[str, Any], prefix: str | None, subdir: str = ""):
    """The master's last step of a sharded save: the optimizer index for ``plan``."""

    def write(writer: FileWriter, plan: OwnedFilePlan) -> list[FileRecord]:
        model_plan = ModelFilePlan(tuple(plan.files), plan.weight_map or {}, plan.total_size)
        base = f"{subdir}/" if subdir else ""
        body = ofiles.optimizer_index_bytes(model_plan, description)
        return [writer.write(base + ofiles.index_name(prefix), [body])]

    return write


def optimizer_write_spec(opts: ofiles.OptimizerSaveOptions) -> WriteSpec:
    return WriteSpec(ofiles.weights_name(opts.prefix), opts.max_shard_bytes, shard=True, use_safetensors=True)


def write_optimizer_into(
    writer: FileWriter, subdir: str, optimizer: torch.optim.Optimizer, opts: ofiles.OptimizerSaveOptions, group: Group
) -> list[FileRecord]:
    """Every rank writes its owned optimizer shards into a shared staging folder; the
    master adds the index. Returns this rank's records."""
    if opts.layout != "ckptio":
        full = full_state_dict_on_master(optimizer, group)
        return collective_step(
            group,
            "writing the optimizer (ColossalAI layout)",
            lambda: (
                colossal_optim.write(
                    writer, full, prefix=opts.prefix, max_shard_bytes=opts.max_shard_bytes, subdir=subdir
                )
                if group.rank == 0
                else []
            ),
        )
    flat, description = flat_optimizer_state(optimizer)
    return write_flat_optimizer_into(writer, subdir, flat, description, opts, group)


def write_flat_optimizer_into(
    writer: FileWriter,
    subdir: str,
    flat: dict[str, Any],
    description: dict[str, Any],
    opts: ofiles.OptimizerSaveOptions,
    group: Group,
) -> list[FileRecord]:
    """ckptio's sharded layout from already flattened state (live, or a background save's staged parts)."""
    plan, records = write_state(flat, writer, optimizer_write_spec(opts), group, subdir=subdir)
    write_index = index_writer(description, opts.prefix, subdir)
    records += collective_step(
        group, "writing the optimizer index", lambda: write_index(writer, plan) if group.rank == 0 else []
    )
    return records


def full_state_dict_on_master(optimizer: torch.optim.Optimizer, group: Group) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` with full CPU tensors on the master (``None`` elsewhere).

    For layouts that keep whole tensors in one place (one torch file, ColossalAI's layout);
    DTensors, nested ones too, are all-gathered one at a time (the same order on every rank).
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


def save_full_on_master(
    optimizer: torch.optim.Optimizer, checkpoint: str, opts: ofiles.OptimizerSaveOptions, group: Group
) -> None:
    """``shard=False`` (one torch file) or the ColossalAI layout, written by the master."""
    write_full_on_master(full_state_dict_on_master(optimizer, group), checkpoint, opts, group)


def write_full_on_master(
    full: dict[str, Any] | None, checkpoint: str, opts: ofiles.OptimizerSaveOptions, group: Group
) -> None:
    """The master writes ``full`` (gathered already); every rank of ``group`` learns the outcome."""

    def save() -> None:
        if group.rank != 0:
            return
        if not opts.shard:
            commit: Any = atomic.FileCommit(checkpoint).begin()
            with atomic.aborting_on_error(commit):
                with commit.writer.open_stream(commit.staging_name) as stream:
                    torch_format.save(full, stream)
                commit.commit(stream.record)
            return
        commit = atomic.FolderCommit(checkpoint, owns=ofiles.owned_files(opts.prefix)).begin()
        with atomic.aborting_on_error(commit):
            commit.commit(
                colossal_optim.write(commit.writer, full, prefix=opts.prefix, max_shard_bytes=opts.max_shard_bytes)
            )

    collective_step(group, f"saving the optimizer to {checkpoint}", save)


# ------------------------------------------------------------------------------ loading


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


class _BoxRefReader:
    """Resolves a :class:`~ckptio.checkpoint_io.optimizer_state.TensorRef` to the part this
    rank needs: for a DTensor parameter only its box is read from the file."""

    def __init__(self, folder, weight_map: dict[str, str]) -> None:
        self.folder = folder
        self.weight_map = weight_map
        self._open: dict[str, BoxReader] = {}

    def _reader(self, ref: ostate.TensorRef) -> BoxReader:
        name = self.weight_map.get(ref.key)
        if name is None:
            raise CheckpointCorruptError(f"index has no file for state tensor {ref.key!r}", path=self.folder)
        reader = self._open.get(name)
        if reader is None:
            reader = self._open[name] = BoxReader(self.folder / name)
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
            return place_like(reader.read_full(ref.key), param)
        region = local_region(param)
        if not region.box:
            return place_like(reader.read_full(ref.key), param)
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


def load_optimizer_local(optimizer: torch.optim.Optimizer, checkpoint: str, *, verify: bool) -> None:
    """This rank's part of a collective optimizer load (any layout, any saved world size)."""
    ofiles.apply_optimizer_state(optimizer, prepare_optimizer_local(optimizer, checkpoint, verify=verify), checkpoint)


def prepare_optimizer_local(optimizer: torch.optim.Optimizer, checkpoint: str, *, verify: bool) -> dict[str, Any]:
    """This rank's part of the state to load, read and checked against ``optimizer`` without
    changing it (no collectives: every rank decides alone, the caller gathers the verdicts)."""
    located = ofiles.locate_optimizer(checkpoint)
    saved, reader = ofiles.read_saved_optimizer(located, verify=verify)
    if reader is not None:
        reader.close()
    skeleton, params = ostate.match_saved_to_live(saved, optimizer, ostate.param_names(optimizer))
    if located.layout == "ckptio":
        boxes = _BoxRefReader(located.path.parent, read_index(located.path).weight_map)
        try:
            ostate.materialize(skeleton, params, boxes)
        finally:
            boxes.close()
    else:  # whole tensors were read; keep this rank's part of each
        for pid, entries in skeleton["state"].items():
            for sname, value in entries.items():
                entries[sname] = ostate.map_tensors(value, lambda t, p=params[pid]: place_like(t, p))
    return skeleton
