"""The shard splitter: a pure function from sizes to a frozen plan.

It knows nothing of tensors or files, so it is tested with plain integers.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardPlan:
    """``shards[i]`` lists the item names of shard ``i`` in their original order."""

    shards: tuple[tuple[str, ...], ...]
    shard_bytes: tuple[int, ...]

    @property
    def total_bytes(self) -> int:
        return sum(self.shard_bytes)

    def __len__(self) -> int:
        return len(self.shards)


def split_greedy(items: Sequence[tuple[str, int]], max_shard_bytes: int) -> ShardPlan:
    """Pack items into shards in order, starting a new shard when the next would overflow.

    An item larger than ``max_shard_bytes`` gets a shard of its own; items are never split.
    Order is kept (Hugging Face and ColossalAI do the same), so the shard of a tensor is
    predictable and files stream in state-dict order.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = []
    sizes: list[int] = []
    current: list[str] = []
    current_bytes = 0
    for name, nbytes in items:
        if nbytes < 0:
            raise ValueError(f"item {name!r} has negative size {nbytes}")
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            sizes.append(current_bytes)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    if current or not shards:
        shards.append(current)
        sizes.append(current_bytes)
    return ShardPlan(tuple(tuple(s) for s in shards), tuple(sizes))


def assign_owners(sizes: Sequence[int], n_owners: int) -> tuple[int, ...]:
    """Give each item an owner so the owners' byte totals are balanced (largest first).

    Ties go to the lowest owner, so every rank computes the same answer without talking.
    """
    if n_owners <= 0:
        raise ValueError(f"n_owners must be positive, got {n_owners}")
    heap = [(0, r) for r in range(min(n_owners, len(sizes)))]  # (load, owner): the least loaded, lowest first
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, owner = heapq.heappop(heap)
        owners[index] = owner
        heapq.heappush(heap, (load + sizes[index], owner))
    return tuple(owners)
