"""``save_checkpoint(..., use_async=True)`` in one process: one background job for the whole folder.

Model and optimizer are staged together (slots ``"model"`` and ``"optimizer"``), the small
files (LR scheduler, RNG, running states) are rendered to bytes at call time, and the job
writes everything into one staging folder and commits it once, exactly like the synchronous
save. One job, not one per part: the next part would otherwise wait for the previous one.

Several ranks: :mod:`ckptio.async_io.distributed_checkpoint_job`.
"""

from __future__ import annotations

import io as _io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ckptio.checkpoint_io.general import GeneralCheckpointIO, live_model_state_for_staging
from ckptio.checkpoint_io.hf_config import hf_config_files
from ckptio.checkpoint_io.lr_scheduler_files import scheduler_bytes
from ckptio.checkpoint_io.model_files import ModelSaveOptions, write_model_files
from ckptio.checkpoint_io.model_state import unwrap_model
from ckptio.checkpoint_io.optimizer_files import OptimizerSaveOptions, write_optimizer_files
from ckptio.checkpoint_io.optimizer_files import snapshot as optimizer_snapshot
from ckptio.storage import atomic


def can_submit(io: Any) -> bool:
    """True when ``io`` writes training checkpoints with the single-process hooks."""
    hooks = ("_write_model_into", "_write_optimizer_into", "_write_lr_scheduler_into")
    return isinstance(io, GeneralCheckpointIO) and all(
        getattr(type(io), h) is getattr(GeneralCheckpointIO, h) for h in hooks
    )


def _lr_scheduler_bytes(lr_scheduler: Any) -> bytes:
    data, state = scheduler_bytes(lr_scheduler.state_dict())
    if data is None:  # no exact JSON form: a torch file, as the synchronous save writes
        buffer = _io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    return data


@dataclass(frozen=True)
class CheckpointParts:
    """What one training checkpoint holds, as ``save_checkpoint`` hands it to a background job.

    ``own_files`` are this rank's (its RNG file), ``master_files`` the shared small files that
    only the master writes (running states); both are already rendered to bytes.
    """

    model: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    model_opts: ModelSaveOptions
    optim_opts: OptimizerSaveOptions
    model_dir: str
    optimizer_dir: str
    lr_scheduler_name: str
    own_files: dict[str, bytes]
    master_files: dict[str, bytes]
    manifest_extra: dict[str, Any] | None = None


def submit_in_background(io: Any, target: Path, parts: CheckpointParts, world_size: int) -> bool:
    """Stage now and write + commit ``target`` in the background; False where that cannot be
    done (the caller then saves synchronously). Every rank gets the same answer."""
    if world_size > 1:
        from ckptio.async_io.distributed_checkpoint_job import submit_distributed_training_checkpoint

        return submit_distributed_training_checkpoint(io, target, parts)
    if not can_submit(io):
        return False
    submit_training_checkpoint(io, target, parts)
    return True


def submit_training_checkpoint(io: GeneralCheckpointIO, target: Path, parts: CheckpointParts) -> None:
    """One process: stage everything now; write and commit ``target`` on ``io``'s background writer."""
    model_opts, optim_opts = parts.model_opts, parts.optim_opts
    live = live_model_state_for_staging(parts.model)
    extra = hf_config_files(unwrap_model(parts.model)) if model_opts.shard else {}
    snap = optimizer_snapshot(parts.optimizer) if parts.optimizer is not None else None
    small = {**parts.own_files, **parts.master_files}
    if parts.lr_scheduler is not None:
        small[parts.lr_scheduler_name] = _lr_scheduler_bytes(parts.lr_scheduler)

    def stage(staging):
        model_state = staging.stage(live, slot="model")
        staged_snap = None
        if snap is not None:
            staged_snap = replace(snap, state_dict=staging.stage_tree(snap.state_dict, slot="optimizer"))
        return model_state, staged_snap

    def write(staged) -> None:
        model_state, staged_snap = staged
        commit = atomic.FolderCommit(target).begin()
        with atomic.aborting_on_error(commit):
            writer = commit.writer
            records = write_model_files(writer, model_state, model_opts, subdir=parts.model_dir, extra_files=extra)
            if staged_snap is not None:
                records += write_optimizer_files(writer, staged_snap, optim_opts, subdir=parts.optimizer_dir)
            records += [writer.write(name, [body]) for name, body in small.items()]
            commit.commit(records, manifest_extra=parts.manifest_extra)

    io.async_saver.submit(stage, write, what=f"training checkpoint {target}")
