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
from ckptio.engine.spread import AmongSpread, ExchangedSpread, Spread
from ckptio.engine.tensors import Deferred, StagedPart, is_dtensor, local_region


def gather_full(t, spread: Spread, owner: int, group: Group, dtype: torch.dtype | None = None):
    """The full CPU tensor on ``owner``; ``None`` elsewhere. Every rank of ``group`` calls this
    for the same tensor in the same order. A :class:`Deferred` tensor is handed on unread.
    ``t`` is None on a rank that does not hold the key (ranks holding different keys), which
    then needs ``dtype`` to receive it if it owns the file."""
    if isinstance(t, Deferred):
        return t if group.rank == owner else None
    with peer_failure(f"sending a tensor to rank {owner}, which writes it"):
        return _gather_full(t, spread, owner, group, t.dtype if t is not None else dtype)


def _not_boxes(spread: Spread) -> ExchangedSpread | None:
    inner = spread.inner if isinstance(spread, AmongSpread) else spread
    return inner if isinstance(inner, ExchangedSpread) and not all(r.box for r in inner.regions) else None


def _gather_full(t, spread: Spread, owner: int, group: Group, dtype: torch.dtype) -> torch.Tensor | None:
    rank = group.rank
    shape = tuple(int(d) for d in spread.shape)
    if _not_boxes(spread) is not None:
        # not boxes: torch's own collective on the mesh (every rank holding it calls it)
        full = t.full_tensor().detach().cpu().contiguous() if t is not None else None
        holders = spread.holders if isinstance(spread, AmongSpread) else None
        if holders is None or owner in holders:
            return full if rank == owner else None
        sender = min(holders)  # the owner holds none of it: the lowest holder sends it
        if rank == sender:
            dist.isend(full, dst=group.global_rank(owner), group=group.group).wait()
        elif rank == owner:
            full = torch.empty(shape, dtype=dtype)
            dist.irecv(full, src=group.global_rank(sender), group=group.group).wait()
            return full
        return None
    if t is None:
        local = None
    elif isinstance(t, StagedPart):
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
        if local is not None and spread.writes(rank) and local_region(t).numel:
            dist.isend(local.contiguous(), dst=group.global_rank(owner), group=group.group).wait()
        return None
    out = torch.empty(shape, dtype=dtype)
    ops, received = [], []
    for src, region in spread.sources():
        if src == owner:
            out[region.index()].copy_(local.cpu())
            continue
        view = out[region.index()]
        device = local.device if local is not None else torch.device("cpu")
        direct = device.type == "cpu" and view.is_contiguous()  # e.g. a Shard(0) row block
        buf = view if direct else torch.empty(region.shape, dtype=dtype, device=device)
        ops.append(dist.irecv(buf, src=group.global_rank(src), group=group.group))
        if not direct:
            received.append((region, buf))
    for op in ops:
        op.wait()
    for region, buf in received:
        out[region.index()].copy_(buf.cpu())
    return out
