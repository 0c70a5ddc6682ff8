"""``save_checkpoint(..., use_async=True)`` in one process: one background job for the whole folder.

Model and optimizer are staged together (slots ``"model"`` and ``"optimizer"``), the small
files (LR scheduler, RNG, running states) are rendered to bytes at call time, and the job
writes everything into one staging folder and commits it once, exactly like the synchronous
save. One job, not one per part: the next part would otherwise wait for the previous one.

Several ranks: :mod:`ckptio.async_io.distributed_checkpoint_job`.
"""

from __future__ import annotations

import io as _io
from dataclasses import replace
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


def submit_training_checkpoint(
    io: GeneralCheckpointIO,
    target: Path,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    lr_scheduler: Any,
    model_opts: ModelSaveOptions,
    optim_opts: OptimizerSaveOptions,
    model_dir: str,
    optimizer_dir: str,
    lr_scheduler_name: str,
    files: dict[str, bytes],
) -> None:
    """Stage everything now; write and commit ``target`` on ``io``'s background writer."""
    live = live_model_state_for_staging(model)
    extra = hf_config_files(unwrap_model(model)) if model_opts.shard else {}
    snap = optimizer_snapshot(optimizer) if optimizer is not None else None
    small = dict(files)
    if lr_scheduler is not None:
        small[lr_scheduler_name] = _lr_scheduler_bytes(lr_scheduler)

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
            records = write_model_files(writer, model_state, model_opts, subdir=model_dir, extra_files=extra)
            if staged_snap is not None:
                records += write_optimizer_files(writer, staged_snap, optim_opts, subdir=optimizer_dir)
            records += [writer.write(name, [body]) for name, body in small.items()]
            commit.commit(records)

    io.async_saver.submit(stage, write, what=f"training checkpoint {target}")
