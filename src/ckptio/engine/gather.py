"""Collecting a full tensor on the rank that writes it, from the boxes the ranks hold.

Point to point: each distinct box travels once, from the rank that :mod:`ckptio.engine.spread`
names as its sender to the owner; an owner that holds the whole tensor (a replica) takes it
from its own memory. Only the owner walks the list of boxes; every other rank only asks
whether it sends its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ckptio.engine.group import Group, peer_failure
from ckptio.engine.spread import ExchangedSpread, Spread
from ckptio.engine.tensors import Deferred, StagedPart, is_dtensor, local_region


def gather_full(t, spread: Spread, owner: int, group: Group) -> torch.Tensor | Deferred | None:
    """The full CPU tensor on ``owner``; ``None`` elsewhere. Every rank of ``group`` calls this
    for the same tensor in the same order. A :class:`Deferred` tensor is handed on unread."""
    if isinstance(t, Deferred):
        return t if group.rank == owner else None
    with peer_failure(f"sending a tensor to rank {owner}, which writes it"):
        return _gather_full(t, spread, owner, group)


def _gather_full(t, spread: Spread, owner: int, group: Group) -> torch.Tensor | None:
    rank = group.rank
    shape = tuple(int(d) for d in t.shape)
    if isinstance(spread, ExchangedSpread) and not all(r.box for r in spread.regions):
        full = t.full_tensor()  # not boxes: torch's own collective on the mesh (every rank calls it)
        return full.detach().cpu().contiguous() if rank == owner else None
    if isinstance(t, StagedPart):
        local = t.local
    elif is_dtensor(t):
        local = t.to_local().detach()
    else:
        local = t.detach()
    owner_box = spread.box(owner)
    if owner_box.box and owner_box.shape == shape:
        # the owner holds the whole tensor (a replica, a world of one): nothing travels
        return local.cpu().contiguous() if rank == owner else None
    if rank != owner:
        if spread.writes(rank) and local_region(t).numel:
            dist.isend(local.contiguous(), dst=group.global_rank(owner), group=group.group).wait()
        return None
    out = torch.empty(shape, dtype=t.dtype)
    ops, received = [], []
    for src, region in spread.sources():
        if src == owner:
            out[region.index()].copy_(local.cpu())
            continue
        view = out[region.index()]
        direct = local.device.type == "cpu" and view.is_contiguous()  # e.g. a Shard(0) row block
        buf = view if direct else torch.empty(region.shape, dtype=t.dtype, device=local.device)
        ops.append(dist.irecv(buf, src=group.global_rank(src), group=group.group))
        if not direct:
            received.append((region, buf))
    for op in ops:
        op.wait()
    for region, buf in received:
        out[region.index()].copy_(buf.cpu())
    return out
