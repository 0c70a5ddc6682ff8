"""Who writes what in a multi-rank save: a pure function from tensor sizes to owned files.

Every full tensor gets one owner rank, chosen so the ranks' byte totals are balanced
(:func:`~ckptio.planning.split.assign_owners`); each owner packs its tensors into
size-bounded shards; the shards are numbered globally so the folder is an ordinary
Hugging Face layout (``model-00003-of-00008.safetensors``) that says nothing about ranks.
Every rank computes the same plan from the same inputs without talking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ckptio.formats import naming
from ckptio.planning.split import assign_owners, split_greedy


@dataclass(frozen=True)
class OwnedFilePlan:
    """Files of one save: ``files[i] = (name, keys)`` is written by rank ``owners[i]``.

    ``sharded`` is False for a one-file save (no index).
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


def plan_owned_files(
    sizes: Sequence[tuple[str, int]],
    world_size: int,
    *,
    weights_name: str,
    max_shard_bytes: int,
    shard: bool = True,
    single_writer: int = 0,
) -> OwnedFilePlan:
    """Balance tensors over ``world_size`` writers, then shard each writer's part.

    ``shard=False`` gives one file named ``weights_name`` written by ``single_writer``.
    A writer with no tensors writes no file; an empty state still gets one (empty) file.
    """
    total = sum(n for _, n in sizes)
    if not shard:
        return OwnedFilePlan(((weights_name, tuple(k for k, _ in sizes)),), (single_writer,), total, False)
    owners = assign_owners([n for _, n in sizes], world_size) if sizes else ()
    groups: list[tuple[int, tuple[str, ...]]] = []
    for rank in range(world_size):
        mine = [(k, n) for (k, n), owner in zip(sizes, owners) if owner == rank]
        if not mine:
            continue
        groups.extend((rank, keys) for keys in split_greedy(mine, max_shard_bytes).shards)
    if not groups:
        groups = [(single_writer, ())]
    count = len(groups)
    files = tuple((naming.shard_name(weights_name, i, count), keys) for i, (_, keys) in enumerate(groups))
    return OwnedFilePlan(files, tuple(rank for rank, _ in groups), total, True)
