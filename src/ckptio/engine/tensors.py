"""Which part of a full tensor a rank holds, and how the writer of a file collects the parts.

Generic over DTensor layouts: any mesh shape, ``Shard(dim)`` on any dimension (uneven
too), ``Replicate``, and ``Partial`` (reduced first). A rank's part is a box
``(offset, shape)`` of the full tensor computed with torch's own
``compute_local_shape_and_global_offset``. Plain tensors are full replicas (DDP).
``_StridedShard`` (FSDP2 over ``dp`` on top of tensor parallel) is a box too when the
rank's indices are contiguous (:func:`_strided_box` checks); layouts whose local part is
not one box fall back to ``full_tensor()`` / slicing a full read, correct but more bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ckptio.errors import CheckpointError

try:  # torch >= 2.4 exposes the public DTensor module
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover (very old torch)
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


@dataclass(frozen=True)
class Region:
    """A box of a full tensor: ``offset`` and ``shape`` per dimension. ``box=False`` means
    the local part is not a box (strided layouts): it is handled through full tensors."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    box: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def index(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape))


def _simple_placements(t) -> bool:
    return all(type(p) is Shard or type(p) is Replicate for p in t.placements)


def _strided_box(t) -> Region | None:
    """The box a rank holds under ``_StridedShard`` placements, or ``None`` if its part is
    not one box (or this torch lacks the helper). FSDP2 over ``dp`` on top of a tensor-parallel
    ``Shard(d)`` on ``tp`` gives ``(_StridedShard(d, sf=tp), Shard(d))``: the dp sub-block of
    the tp block, contiguous. Exact per-dimension indices come from torch's own helper, so
    contiguity is checked, not assumed."""
    try:
        from torch.distributed.tensor._utils import _get_shard_size_and_offsets
        from torch.distributed.tensor.placement_types import _StridedShard

        mesh, coord = t.device_mesh, t.device_mesh.get_coordinate()
        shape, indices = [int(d) for d in t.shape], {}
        for mesh_dim, p in enumerate(t.placements):
            if type(p) is Replicate:
                continue
            if not isinstance(p, (Shard, _StridedShard)):
                return None
            d = p.dim
            size, idx = _get_shard_size_and_offsets(
                shape[d], mesh.size(mesh_dim), coord[mesh_dim], p, indices.get(d), int(t.shape[d]), False
            )
            shape[d], indices[d] = int(size), idx
        offset = [0] * len(shape)
        for d, idx in indices.items():
            if shape[d] == 0:
                continue
            first = int(idx[0])
            if not torch.equal(idx.to(torch.int64), torch.arange(first, first + shape[d])):
                return None
            offset[d] = first
        return Region(tuple(offset), tuple(shape))
    except Exception:  # noqa: BLE001 (private torch helper: fall back to full tensors)
        return None


def without_partial(t):
    """Reduce ``Partial`` placements (a collective over the mesh), keep the rest."""
    if is_dtensor(t) and any(p.is_partial() for p in t.placements):
        placements = [Replicate() if p.is_partial() else p for p in t.placements]
        return t.redistribute(t.device_mesh, placements)
    return t


@dataclass(frozen=True)
class StagedPart:
    """What this rank holds of one tensor, copied to host memory for a background save: its
    box of a sharded DTensor, a whole replica it will write, or (a replica another rank
    writes) an empty placeholder.

    It stands in for the live tensor in the write path (same ``shape``, ``dtype`` and region),
    so the background thread never touches the live tensor or its mesh's process group.
    """

    local: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    region: Region
    spread: object = None  # how the ranks hold the tensor (engine.spread), as worked out at staging


@dataclass(frozen=True)
class Deferred:
    """A full tensor that is read only when its file is written (``convert`` streams a source
    checkpoint this way): dtype and shape are known up front, ``load()`` returns the tensor.
    ``pieces()``, when given, yields the same values as consecutive row-major blocks, so a writer
    that streams bytes (safetensors) never holds the whole tensor."""

    shape: torch.Size
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    pieces: Callable[[], Iterator[torch.Tensor]] | None = None


def refuse_meta(state: dict[str, torch.Tensor]) -> None:
    """Raise, naming them, if tensors of a state to save are on the ``meta`` device: they have
    no values, and a file of uninitialised bytes would load as if it were weights."""
    meta = [k for k, t in state.items() if isinstance(t, torch.Tensor) and local_part(t).device.type == "meta"]
    if meta:
        shown = ", ".join(meta[:10]) + (f", ... ({len(meta) - 10} more)" if len(meta) > 10 else "")
        raise CheckpointError(
            f"{len(meta)} tensors to save are on the meta device and hold no values: {shown}; "
            "load or initialise them first (model.to_empty(device=...) then load, or load_model into the meta model)"
        )


def can_stage_parts(state: dict[str, torch.Tensor]) -> bool:
    """Whether every DTensor of ``state`` holds one box per rank and no pending reduction,
    which is what a background save needs (anything else takes collectives on the mesh)."""
    return not any(
        is_dtensor(t) and (any(p.is_partial() for p in t.placements) or not local_region(t).box) for t in state.values()
    )


def stage_parts(state: dict[str, torch.Tensor], writer_of: dict[str, int], rank: int) -> dict[str, torch.Tensor]:
    """What this rank must copy for an async save of ``state``: its box of each sharded DTensor,
    and the whole replicas (plain tensors under DDP, replicated DTensors; the keys of
    ``writer_of``) that it writes itself. Other ranks stage nothing of a replica (the writer is
    the only source of that tensor), so host memory and copy time are about 1/N of the state
    each. Local work only, no collective, no copy."""
    refuse_meta(state)
    return {k: local_part(t) for k, t in state.items() if k not in writer_of or writer_of[k] == rank}


def staged_parts(
    state: dict[str, torch.Tensor], copies: dict[str, torch.Tensor], spreads: dict
) -> dict[str, StagedPart]:
    """The staged stand-ins of ``state``'s tensors: each key's host copy (from :func:`stage_parts`)
    with its region, or an empty placeholder holding no box (a replica another rank writes)."""
    out = {}
    for k, t in state.items():
        if k in copies:
            out[k] = StagedPart(copies[k], t.shape, t.dtype, local_region(t), spreads[k])
        else:
            nothing = Region((0,) * t.dim(), (0,) * t.dim())
            out[k] = StagedPart(torch.empty(0, dtype=t.dtype), t.shape, t.dtype, nothing, spreads[k])
    return out


def local_region(t: torch.Tensor) -> Region:
    """The box of the full tensor this rank holds (the whole tensor for a plain tensor)."""
    if isinstance(t, StagedPart):
        return t.region
    full = tuple(int(d) for d in t.shape)
    if isinstance(t, Deferred):
        return Region((0,) * len(full), full)
    if not is_dtensor(t):
        return Region((0,) * len(full), full)
    if t.device_mesh.get_coordinate() is None:  # this rank is outside the tensor's mesh
        return Region((0,) * len(full), (0,) * len(full))
    if not _simple_placements(t):
        strided = _strided_box(t)  # FSDP2 over dp x tensor parallel: usually still one box
        return strided if strided is not None else Region((0,) * len(full), full, box=False)
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return Region(tuple(int(o) for o in offset), tuple(int(s) for s in shape))


def local_part(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t
