"""``save_checkpoint(..., use_async=True)`` on several ranks: stage each rank's parts, then
write and commit the folder from a background thread on every rank.

The call copies what this rank holds (its DTensor boxes, or the whole replica under DDP)
into the reused staging buffers and renders the small files (LR scheduler, running states,
this rank's RNG) to bytes; then every rank's background thread runs the same collective
write and commit as the synchronous save, over the checkpoint IO's own background process
group so that none of its collectives interleave with training's on the default group.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ckptio.async_io.checkpoint_job import CheckpointParts, _lr_scheduler_bytes
from ckptio.checkpoint_io import distributed_optim as doptim
from ckptio.checkpoint_io.distributed import DistributedCheckpointIO, model_state_to_save
from ckptio.checkpoint_io.distributed_state import WriteSpec
from ckptio.checkpoint_io.distributed_tensors import can_stage_parts
from ckptio.checkpoint_io.hf_config import hf_config_files
from ckptio.checkpoint_io.model_state import unwrap_model


def submit_distributed_training_checkpoint(io: Any, target: Path, parts: CheckpointParts) -> bool:
    """Stage and submit; False (nothing done, save synchronously) where a background save cannot run.

    Every rank reaches the same answer: the checks depend only on the kinds of placements and
    the optimizer layout, which all ranks share.
    """
    from ckptio.training.checkpoint import commit_collectively

    if not isinstance(io, DistributedCheckpointIO):
        return False
    model, optimizer, model_opts, optim_opts = parts.model, parts.optimizer, parts.model_opts, parts.optim_opts
    if optimizer is not None and optim_opts.layout != "ckptio":
        return False  # ColossalAI's layout gathers everything on the master with collectives on the mesh
    model_state = model_state_to_save(model)
    flat, description = doptim.flat_optimizer_state(optimizer) if optimizer is not None else ({}, {})
    description = copy.deepcopy(description)  # hyper-parameters as they are now, not after the next step
    if not (can_stage_parts(model_state) and can_stage_parts(flat)):
        return False
    group = io._background_group()
    if group is None:
        return False
    extra = hf_config_files(unwrap_model(model))
    master_files = dict(parts.master_files)
    if parts.lr_scheduler is not None:
        master_files[parts.lr_scheduler_name] = _lr_scheduler_bytes(parts.lr_scheduler)

    def stage(staging):
        what = f"training checkpoint {target}"
        return (
            io._stage_own_parts(staging, model_state, WriteSpec.for_model(model_opts), "model", what),
            io._stage_own_parts(staging, flat, doptim.optimizer_write_spec(optim_opts), "optimizer", what),
        )

    def write(staged) -> None:
        staged_model, staged_flat = staged

        def write_files(writer) -> list:
            records = io._write_model_state_into(writer, parts.model_dir, staged_model, model_opts, extra, group)
            if optimizer is not None:
                records += doptim.write_flat_optimizer_into(
                    writer, parts.optimizer_dir, staged_flat, description, optim_opts, group
                )
            records += [writer.write(name, [data]) for name, data in parts.own_files.items()]
            if group.rank == 0:
                records += [writer.write(name, [data]) for name, data in master_files.items()]
            return records

        commit_collectively(target, group, write_files, parts.manifest_extra)

    io.async_saver.submit(stage, write, what=f"training checkpoint {target}")
    return True
