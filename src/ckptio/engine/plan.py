"""The files of a save and who writes each: a pure function from tensor sizes to a plan.

The shard layout depends only on the tensors and the options, never on the number of
ranks: tensors are packed into size-bounded shards in state order
(:func:`~ckptio.engine.split.split_greedy`, as Hugging Face and ColossalAI pack them), so
one process, 2 or 4 ranks, FSDP2 or DDP write the same files, byte for byte. Tensors that
do not change between saves (``static``: frozen parameters) are packed first, into shards
of their own: a shard that mixed them with trained tensors would change at every save, one
that holds only them keeps its bytes and is linked, not rewritten, by the next checkpoint
(:mod:`ckptio.storage.reuse`). Only then is
each file given an owner rank, balancing the ranks' bytes
(:func:`~ckptio.engine.split.assign_owners`). Every rank computes the same plan from the
same inputs without talking.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from ckptio.engine.split import assign_owners, split_greedy
from ckptio.formats import naming


@dataclass(frozen=True)
class FilePlan:
    """Files of one save: ``files[i] = (name, keys)`` is written by rank ``owners[i]``.

    ``sharded`` is False for a one-file save (no index, no shard numbering).
    """

    files: tuple[tuple[str, tuple[str, ...]], ...]
    owners: tuple[int, ...]
    total_size: int
    sharded: bool

    @property
    def weight_map(self) -> dict[str, str] | None:
        if not self.sharded:
            return None
        return {key: name for name, keys in self.files for key in keys}

    def files_of(self, rank: int) -> list[int]:
        return [i for i, owner in enumerate(self.owners) if owner == rank]

    def writers(self) -> dict[str, int]:
        return {name: owner for (name, _), owner in zip(self.files, self.owners)}


def plan_files(
    sizes: Sequence[tuple[str, int]],
    world_size: int,
    *,
    weights_name: str,
    max_shard_bytes: int,
    shard: bool = True,
    empty_file: bool = True,
    static: Collection[str] = (),
) -> FilePlan:
    """Pack tensors into shards (state order), then balance the shards over ``world_size`` writers.

    ``shard=False`` gives one file named ``weights_name`` written by rank 0. An empty state
    gives one empty file when ``empty_file`` (a model folder always has weights) and no file
    otherwise (an optimizer before its first step has no state tensors). Keys in ``static``
    go first, in shards that hold nothing else (each group keeps state order).
    """
    total = sum(n for _, n in sizes)
    if not shard:
        return FilePlan(((weights_name, tuple(k for k, _ in sizes)),), (0,), total, False)
    if not sizes and not empty_file:
        return FilePlan((), (), 0, True)
    static = set(static)
    groups = [g for g in ([s for s in sizes if s[0] in static], [s for s in sizes if s[0] not in static]) if g]
    shards: list[tuple[str, ...]] = []
    shard_bytes: list[int] = []
    for items in groups or [[]]:
        split = split_greedy(items, max_shard_bytes)
        shards += split.shards
        shard_bytes += split.shard_bytes
    count = len(shards)
    files = tuple((naming.shard_name(weights_name, i, count), keys) for i, keys in enumerate(shards))
    owners = assign_owners(shard_bytes, world_size)
    return FilePlan(files, owners, total, True)


def replica_writers(
    sizes: Sequence[tuple[str, int]], world_size: int, holders: Mapping[str, Collection[int]] | None = None
) -> dict[str, int]:
    """Which rank writes (or reads) each tensor every rank holds whole: byte-balanced, largest
    first, ties to the lowest rank, so every rank computes the same answer without talking.
    ``holders``: the ranks that hold a key only some ranks hold (the writer is one of them)."""
    if not holders:
        owners = assign_owners([n for _, n in sizes], world_size)
        return {key: owner for (key, _), owner in zip(sizes, owners)}
    load = [0] * world_size
    out: dict[str, int] = {}
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i][1], i)):
        key, size = sizes[index]
        candidates = holders.get(key) or range(world_size)
        writer = min(candidates, key=lambda r: (load[r], r))
        load[writer] += size
        out[key] = writer
    return out
