"""DistCoordinator: who am I among the ranks, and helpers to act on the master only.

Works with or without an initialised process group: without one it describes a world of
one (or what ``torchrun``'s ``RANK``/``WORLD_SIZE`` variables say before init).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch.distributed as dist

F = TypeVar("F", bound=Callable[..., Any])


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


class DistCoordinator:
    """Rank facts and master-only helpers (ColossalAI's names).

    Args:
        group: the process group to describe (None: the default group, or a world of one).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group

    @property
    def rank(self) -> int:
        """This process's rank in the group (``RANK`` before the group exists, else 0)."""
        return dist.get_rank(self.group) if _initialized() else int(os.environ.get("RANK", 0))

    @property
    def world_size(self) -> int:
        """The number of ranks in the group (``WORLD_SIZE`` before the group exists, else 1)."""
        return dist.get_world_size(self.group) if _initialized() else int(os.environ.get("WORLD_SIZE", 1))

    @property
    def local_rank(self) -> int:
        """The rank on this machine (``LOCAL_RANK``), which picks the GPU."""
        return int(os.environ.get("LOCAL_RANK", self.rank if self.world_size == 1 else os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_distributed(self) -> bool:
        """Whether a process group of more than one rank is initialised."""
        return _initialized() and self.world_size > 1

    def is_master(self) -> bool:
        """Whether this is rank 0, which writes shared files."""
        return self.rank == 0

    def is_last_process(self) -> bool:
        """Whether this is the highest rank."""
        return self.rank == self.world_size - 1

    def block_all(self) -> None:
        """Barrier over the group; a no-op in a world of one."""
        if self.is_distributed:
            dist.barrier(group=self.group)

    def print_on_master(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only.

        Args:
            args: what ``print`` takes.
            kwargs: what ``print`` takes (``file``, ``flush``, ...).
        """
        if self.is_master():
            print(*args, **kwargs)

    def on_master_only(self) -> Callable[[F], F]:
        """Decorator: the function runs on the master only; other ranks get ``None``."""

        def decorator(fn: F) -> F:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if self.is_master():
                    return fn(*args, **kwargs)
                return None

            return wrapper  # type: ignore[return-value]

        return decorator

    @contextlib.contextmanager
    def priority_execution(self, executor_rank: int = 0) -> Iterator[None]:
        """The ``executor_rank`` runs the block first (e.g. to download or build a cache),
        the other ranks run it after it finished.

        Args:
            executor_rank: the rank that goes first.
        """
        if self.rank != executor_rank:
            self.block_all()
        yield
        if self.rank == executor_rank:
            self.block_all()
