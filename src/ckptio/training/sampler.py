"""A ``DistributedSampler`` that can start an epoch part-way (ColossalAI's name and methods)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from ckptio.cluster import DistCoordinator


class StatefulDistributedSampler(DistributedSampler):
    """Shuffles per epoch (``seed + epoch``, like ``DistributedSampler``) and skips the first
    ``start_index`` indices of this rank's share, so a resumed epoch continues at the next
    unseen sample.

    ``start_index`` counts this rank's samples (``step * batch_size`` for a per-rank batch
    size, as ``running_states.json`` stores it). It applies to the next iteration and is
    reset to 0 once an iteration has gone through the whole epoch, so the following epochs
    are complete. ``set_epoch`` leaves it alone, so ColossalChat's order
    (``set_start_index`` then ``set_epoch``) works. Without a process group it is a world
    of one (or what ``DistCoordinator`` reports).

    Args:
        dataset: the dataset to sample.
        num_replicas: the number of ranks sharing it (default: the world size).
        rank: this rank (default: the process group's rank).
        shuffle: shuffle each epoch with ``seed + epoch``.
        seed: the shuffling seed, the same on every rank.
        drop_last: drop the tail that does not divide evenly among the ranks.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        coordinator = DistCoordinator()
        num_replicas = coordinator.world_size if num_replicas is None else num_replicas
        rank = coordinator.rank if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start_index: int = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.start_index :]

        def run() -> Iterator[int]:
            yield from indices
            self.start_index = 0  # the epoch is complete: the next one starts at its beginning

        return run()

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)

    def set_start_index(self, start_index: int) -> None:
        """Skip this rank's first ``start_index`` samples in the next iteration.

        Args:
            start_index: samples of this rank already seen in the epoch (``step * batch_size``).
        """
        if isinstance(start_index, bool) or not isinstance(start_index, int) or start_index < 0:
            raise ValueError(f"start_index must be a non-negative int, got {start_index!r}")
        self.start_index = start_index

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs: epoch, position, and the shuffling settings."""
        return {
            "epoch": self.epoch,
            "start_index": self.start_index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_replicas": self.num_replicas,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore epoch, position and seed (the world size may differ; the position is per rank).

        Args:
            state: what :meth:`state_dict` returned.
        """
        self.epoch = int(state.get("epoch", self.epoch))
        self.seed = int(state.get("seed", self.seed))
        self.set_start_index(int(state.get("start_index", 0)))
