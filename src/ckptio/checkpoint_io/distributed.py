"""CheckpointIO for every multi-rank layout: DDP replicas and DTensor shards alike.

Tensors are plain (replicated on every rank) or DTensors of any placement; the engine in
:mod:`ckptio.checkpoint_io.distributed_state` gives each full tensor one owner rank,
balanced by bytes, and the owners write their files in parallel into one Hugging Face
folder. Loading reads only what each rank holds, so a checkpoint saved at one world size
loads at any other, in a single process, or in ``transformers``. Optimizer state goes the
same way, keyed by parameter name (:mod:`ckptio.checkpoint_io.distributed_optim`).

A plugin with a new layout (e.g. tensor parallel) needs nothing here as long as its
parameters are DTensors: the layout travels with the tensors. Every method is collective.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ckptio.checkpoint_io import distributed_optim as doptim
from ckptio.checkpoint_io.distributed_state import WriteSpec, load_state, save_state, state_aliases, write_state
from ckptio.checkpoint_io.general import GeneralCheckpointIO
from ckptio.checkpoint_io.hf_config import hf_config_files
from ckptio.checkpoint_io.model_files import (
    ModelFilePlan,
    ModelSaveOptions,
    _single_file_is_safetensors,
    model_owned_files,
    write_model_metadata,
)
from ckptio.checkpoint_io.model_state import LoadReport, clean_key, unwrap_model
from ckptio.checkpoint_io.optimizer_files import OptimizerSaveOptions, owned_files
from ckptio.planning.collectives import Group, collective_step


def live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and persistent buffers by clean name, as the live objects
    (``keep_vars``), so tied parameters are one object and loads write into them."""
    return {clean_key(k): v for k, v in unwrap_model(model).state_dict(keep_vars=True).items()}


def model_state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors with tied duplicates dropped (the first name is kept)."""
    state = live_tensors(model)
    aliases = state_aliases(state)
    return {k: v.detach() for k, v in state.items() if k not in aliases}


def _model_plan(plan) -> ModelFilePlan:
    return ModelFilePlan(tuple(plan.files), plan.weight_map, plan.total_size)


class DistributedCheckpointIO(GeneralCheckpointIO):
    """Saves from and loads into every rank of ``group`` (the default group when None).

    ``use_async`` saves are written before the call returns (not overlapped yet).
    """

    def __init__(self, group: Any = None, *, layout: dict[str, Any] | None = None) -> None:
        self.group = Group(group)
        # how the saving job was laid out (plugin, mesh, torch version): recorded in each
        # folder's manifest for inspection, never required to match on load
        self.layout = layout

    def _manifest_extra(self) -> dict[str, Any] | None:
        return {"layout": self.layout} if self.layout else None

    # ------------------------------------------------------------------ model
    def _save_model(self, model: nn.Module, checkpoint: str, opts: ModelSaveOptions, *, gather_dtensor, use_async):
        extra = hf_config_files(unwrap_model(model)) if opts.shard else None
        spec = WriteSpec.for_model(opts)
        if not opts.shard:
            spec = WriteSpec(
                spec.weights_name, spec.max_shard_bytes, False, _single_file_is_safetensors(checkpoint, opts)
            )
        save_state(
            model_state_to_save(model),
            checkpoint,
            spec,
            self.group,
            owns=model_owned_files(opts.prefix),
            metadata=lambda writer, plan: write_model_metadata(writer, _model_plan(plan), opts, extra_files=extra),
            manifest_extra=self._manifest_extra(),
        )

    def _load_model(self, model: nn.Module, checkpoint: str, *, strict, low_cpu_mem_mode, num_threads, verify):
        dest = live_tensors(model)
        report: LoadReport = load_state(
            dest, checkpoint, self.group, strict=strict, aliases=state_aliases(dest), verify=verify
        )
        return report

    # ------------------------------------------------------------------ optimizer
    def _save_optimizer(self, optimizer, checkpoint: str, *, shard, gather_dtensor, prefix, max_shard_bytes, use_async):
        opts = OptimizerSaveOptions(shard, prefix, max_shard_bytes, self.optimizer_layout)
        if not shard or opts.layout != "ckptio":
            doptim.save_full_on_master(optimizer, checkpoint, opts, self.group)
            return
        flat, description = doptim.flat_optimizer_state(optimizer)
        save_state(
            flat,
            checkpoint,
            doptim.optimizer_write_spec(opts),
            self.group,
            owns=owned_files(prefix),
            metadata=doptim.index_writer(description, prefix),
            manifest_extra=self._manifest_extra(),
        )

    def _load_optimizer(self, optimizer, checkpoint: str, *, low_cpu_mem_mode, num_threads, verify):
        collective_step(
            self.group,
            f"loading the optimizer from {checkpoint}",
            lambda: doptim.load_optimizer_local(optimizer, checkpoint, verify=verify),
        )

    # ------------------------------------------------------------------ lr scheduler
    def _save_lr_scheduler(self, lr_scheduler, checkpoint: str) -> None:
        # Scheduler state is the same on every rank: the master writes it, the rest wait.
        collective_step(
            self.group,
            f"saving the LR scheduler to {checkpoint}",
            lambda: (
                super(DistributedCheckpointIO, self)._save_lr_scheduler(lr_scheduler, checkpoint)
                if self.group.rank == 0
                else None
            ),
        )

    def _load_lr_scheduler(self, lr_scheduler, checkpoint: str) -> None:
        collective_step(
            self.group,
            f"loading the LR scheduler from {checkpoint}",
            lambda: super(DistributedCheckpointIO, self)._load_lr_scheduler(lr_scheduler, checkpoint),
        )

    # ------------------------------------------------------------------ inside save_checkpoint
    # ``ckptio.training.save_checkpoint`` stages one folder and calls these on every rank; each
    # returns the records of the files this rank wrote. Failures are raised on all ranks at once.
    def _write_model_into(self, writer, subdir: str, model: nn.Module, opts: ModelSaveOptions) -> list:
        extra = hf_config_files(unwrap_model(model)) if opts.shard else {}
        spec = WriteSpec.for_model(opts)
        plan, records = write_state(model_state_to_save(model), writer, spec, self.group, subdir=subdir)
        return records + collective_step(
            self.group,
            "writing the model index",
            lambda: (
                write_model_metadata(writer, _model_plan(plan), opts, subdir=subdir, extra_files=extra)
                if self.group.rank == 0
                else []
            ),
        )

    def _write_optimizer_into(self, writer, subdir: str, optimizer, opts: OptimizerSaveOptions) -> list:
        return doptim.write_optimizer_into(writer, subdir, optimizer, opts, self.group)
