"""CheckpointIO for every multi-rank layout: DDP replicas and DTensor shards alike.

It is :class:`~ckptio.checkpoint_io.general.GeneralCheckpointIO` on a process group: the same
engine, whose tensors are plain (replicated on every rank) or DTensors of any placement.
Each file gets one owner rank, balanced by bytes, and the owners write their files in
parallel into one Hugging Face folder, the same files one process writes. Loading reads only
what each rank holds, so a checkpoint saved at one world size loads at any other, in a
single process, or in ``transformers``. Optimizer state goes the same way, keyed by
parameter name.

A plugin with a new layout (e.g. tensor parallel) needs nothing here as long as its
parameters are DTensors: the layout travels with the tensors. Every method is collective.
"""

from __future__ import annotations

from typing import Any

from ckptio.checkpoint_io.general import GeneralCheckpointIO
from ckptio.engine.group import Group


class DistributedCheckpointIO(GeneralCheckpointIO):
    """Saves from and loads into every rank of ``group`` (the default group when None).

    ``use_async=True`` (``save_model``, ``save_optimizer``, ``save_checkpoint``): each rank
    copies what it contributes (its shards, and the replicated tensors it writes) into host
    staging buffers and returns; a background thread on every rank then runs the usual
    collective save over a process group of its own (gloo, created at the first async save),
    so its collectives never interleave with training's. An optimizer saved as one file or in
    ColossalAI's layout is gathered on the master during the call and written in the
    background. Layouts that would need collectives on the mesh to stage (``Partial``
    placements, strided shards) and a ``group`` other than the default one save
    synchronously. Call ``booster.wait()`` before destroying the process group.

    Args:
        group: the process group whose ranks save and load together (None: the default group).
        layout: how the job is laid out (plugin, mesh shape), recorded in each folder's manifest.
        keys_differ: the ranks hold different keys (pipeline stages, expert shards). Each key is
            written from the ranks that hold it into one folder of the union of the keys (the
            files any other layout writes); a load fills each rank's keys, and its report is the
            whole model's (a checkpoint key is unexpected only when no rank takes it). Such saves
            are synchronous; the optimizer is saved with ``shard=True`` (ckptio's layout).
    """

    def __init__(self, group: Any = None, *, layout: dict[str, Any] | None = None, keys_differ: bool = False) -> None:
        super().__init__()
        self.group = Group(group)
        self.layout = layout
        self.keys_differ = keys_differ
