"""CheckpointIO for one process (or data parallel replicas handled by hand)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from torch import nn

from ckptio.checkpoint_io.base import CheckpointIO
from ckptio.checkpoint_io.hf_config import hf_config_files
from ckptio.checkpoint_io.lr_scheduler_files import (
    load_lr_scheduler_state,
    prepare_lr_scheduler_load,
    save_lr_scheduler_state,
    write_lr_scheduler,
)
from ckptio.checkpoint_io.model_files import (
    ModelSaveOptions,
    _weights_file_shapes,
    load_model_state,
    locate_model,
    match_files_to_model,
    save_model_state,
    write_model_files,
)
from ckptio.checkpoint_io.model_state import (
    LoadReport,
    alias_groups,
    clean_key,
    model_state_for_save,
    unwrap_model,
)
from ckptio.checkpoint_io.optimizer_files import (
    OptimizerSaveOptions,
    apply_optimizer_state,
    load_optimizer_state,
    prepare_optimizer_state,
    save_optimizer_state,
    write_optimizer_files,
)
from ckptio.checkpoint_io.optimizer_files import snapshot as optimizer_snapshot
from ckptio.cluster import DistCoordinator
from ckptio.errors import StateMismatchError


def live_model_state(model: nn.Module) -> tuple[dict, dict[str, str]]:
    """The live tensors to load into (sharing memory with the parameters) and tied aliases."""
    state = {clean_key(k): v for k, v in unwrap_model(model).state_dict().items()}
    return state, alias_groups(state)


def live_model_state_for_staging(model: nn.Module) -> dict:
    """The tensors an async save snapshots: clean names, tied tensors once, still on their device.

    Unlike :func:`model_state_for_save` nothing is moved or made contiguous here: the staging
    copy does both in one pass into reused host memory.
    """
    raw = {clean_key(k): v for k, v in unwrap_model(model).state_dict().items()}
    aliases = alias_groups(raw)
    return {k: v for k, v in raw.items() if k not in aliases}


class GeneralCheckpointIO(CheckpointIO):
    #: Layout of sharded optimizer saves: "ckptio" (parameter names, safetensors + JSON, the
    #: default) or "colossalai" (ColossalAI's pytorch_optim.bin.index.json layout). Loading
    #: detects the layout. Set it on the instance: ``booster.checkpoint_io.optimizer_layout = "colossalai"``.
    optimizer_layout: str = "ckptio"

    def _save_model(self, model: nn.Module, checkpoint: str, opts: ModelSaveOptions, *, gather_dtensor, use_async):
        extra = hf_config_files(unwrap_model(model)) if opts.shard else None
        if use_async:
            live = live_model_state_for_staging(model)
            self.async_saver.submit(
                lambda staging: staging.stage(live, slot="model"),
                lambda staged: save_model_state(staged, checkpoint, opts, extra_files=extra),
                what=f"model to {checkpoint}",
            )
            return
        state, _ = model_state_for_save(model)
        save_model_state(state, checkpoint, opts, extra_files=extra)

    def _load_model(self, model: nn.Module, checkpoint: str, *, strict, low_cpu_mem_mode, num_threads, verify):
        dest, aliases = live_model_state(model)
        report: LoadReport = load_model_state(
            dest, checkpoint, strict=strict, aliases=aliases, num_threads=num_threads, verify=verify
        )
        return report

    # ------------------------------------------------------------------ optimizer / scheduler
    def _save_optimizer(self, optimizer, checkpoint: str, *, shard, gather_dtensor, prefix, max_shard_bytes, use_async):
        opts = OptimizerSaveOptions(shard, prefix, max_shard_bytes, self.optimizer_layout)
        snap = optimizer_snapshot(optimizer)
        if use_async:
            self.async_saver.submit(
                lambda staging: replace(snap, state_dict=staging.stage_tree(snap.state_dict, slot="optimizer")),
                lambda staged: save_optimizer_state(staged, checkpoint, opts),
                what=f"optimizer to {checkpoint}",
            )
            return
        save_optimizer_state(snap, checkpoint, opts)

    def _load_optimizer(self, optimizer, checkpoint: str, *, low_cpu_mem_mode, num_threads, verify):
        load_optimizer_state(optimizer, checkpoint, verify=verify)

    def _save_lr_scheduler(self, lr_scheduler, checkpoint: str) -> None:
        save_lr_scheduler_state(lr_scheduler, checkpoint)

    def _load_lr_scheduler(self, lr_scheduler, checkpoint: str) -> None:
        load_lr_scheduler_state(lr_scheduler, checkpoint)

    # ------------------------------------------------------------------ checking a training checkpoint first
    # ``ckptio.training.load_checkpoint`` checks every part on every rank before it loads any
    # (one verdict for all ranks), so a refused part leaves the live objects as they were. These
    # change nothing and run no collectives; the ``_prepare_*`` ones return the call that loads.
    def _check_model_load(self, model: nn.Module, checkpoint: str, *, strict: bool) -> LoadReport:
        dest, aliases = live_model_state(model)
        _, report = match_files_to_model(locate_model(checkpoint), dest, aliases, _weights_file_shapes)
        if strict and not report.ok:
            raise StateMismatchError(
                f"checkpoint does not fit the model (strict=True): {report.describe()}", path=checkpoint, report=report
            )
        return report

    def _prepare_optimizer_load(self, optimizer, checkpoint: str, *, verify: bool) -> Callable[[], None]:
        state = prepare_optimizer_state(optimizer, checkpoint, verify=verify)
        return lambda: apply_optimizer_state(optimizer, state, checkpoint)

    def _prepare_lr_scheduler_load(self, lr_scheduler, checkpoint: str) -> Callable[[], None]:
        return prepare_lr_scheduler_load(lr_scheduler, checkpoint)

    # ------------------------------------------------------------------ writing into a training checkpoint
    # ``ckptio.training.save_checkpoint`` stages one folder and calls these on EVERY rank with
    # a writer into it; they return the records of the files this rank wrote. Here (state
    # replicated or one process) the global master writes; distributed CheckpointIOs override.
    def _write_model_into(self, writer, subdir: str, model: nn.Module, opts: ModelSaveOptions) -> list:
        if not DistCoordinator().is_master():
            return []
        state, _ = model_state_for_save(model)
        extra = hf_config_files(unwrap_model(model)) if opts.shard else {}
        return write_model_files(writer, state, opts, subdir=subdir, extra_files=extra)

    def _write_optimizer_into(self, writer, subdir: str, optimizer, opts: OptimizerSaveOptions) -> list:
        if not DistCoordinator().is_master():
            return []
        return write_optimizer_files(writer, optimizer_snapshot(optimizer), opts, subdir=subdir)

    def _write_lr_scheduler_into(self, writer, name: str, lr_scheduler) -> list:
        if not DistCoordinator().is_master():
            return []
        return [write_lr_scheduler(writer, name, lr_scheduler)]
