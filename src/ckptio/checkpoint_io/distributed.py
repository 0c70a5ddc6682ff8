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

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ckptio.checkpoint_io import distributed_optim as doptim
from ckptio.checkpoint_io.distributed_state import (
    WriteSpec,
    _plan_load,
    load_state,
    save_state,
    state_aliases,
    write_state,
    writer_of_each_key,
)
from ckptio.checkpoint_io.distributed_tensors import can_stage_parts, stage_parts
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
from ckptio.checkpoint_io.optimizer_files import OptimizerSaveOptions, apply_optimizer_state, owned_files
from ckptio.errors import StateMismatchError
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

    ``use_async=True`` (``save_model``; ``save_optimizer`` with ``shard=True`` in ckptio's
    layout; ``save_checkpoint``): each rank copies what it contributes (its shards, and the
    replicated tensors it writes) into host staging buffers and returns; a
    background thread on every rank then runs the usual collective save over a process group
    of its own (gloo, created at the first async save), so its collectives never interleave
    with training's. An optimizer saved as one file or in ColossalAI's layout is gathered on
    the master during the call and written in the background. Layouts that would need
    collectives on the mesh to stage (``Partial`` placements, strided shards) and a ``group``
    other than the default one save synchronously. Call ``booster.wait()`` before destroying
    the process group.
    """

    def __init__(self, group: Any = None, *, layout: dict[str, Any] | None = None) -> None:
        self.group = Group(group)
        # how the saving job was laid out (plugin, mesh, torch version): recorded in each
        # folder's manifest for inspection, never required to match on load
        self.layout = layout
        self._background: Group | None = None

    def _background_group(self) -> Group | None:
        """The process group of background saves, or None where async saves stay synchronous."""
        if self._background is None:
            if not self.group.active or self.group.group not in (None, dist.group.WORLD):
                return None  # new_group must be entered by every rank of the world: only for the default group
            self._background = Group(dist.new_group(backend="gloo"))
        return self._background

    def _submit_background(self, state: dict[str, torch.Tensor], spec: WriteSpec, slot: str, what: str, write) -> bool:
        """Stage this rank's parts of ``state`` and run ``write(staged, group)`` in the background.

        Returns False (nothing done) when the state cannot be staged without collectives; every
        rank reaches the same answer, as every rank holds the same kinds of placements.
        """
        if not can_stage_parts(state):
            return False
        group = self._background_group()
        if group is None:
            return False
        self.async_saver.submit(
            lambda staging: self._stage_own_parts(staging, state, spec, slot, what),
            lambda staged: write(staged, group),
            what=what,
        )
        return True

    def _submit_full_on_master(self, optimizer, checkpoint: str, opts: OptimizerSaveOptions) -> bool:
        """One torch file or ColossalAI's layout, in the background: the full state is gathered on
        the master during the call (collectives on the training's group, in the caller's thread)
        and copied to staging; the master then writes it in the background."""
        group = self._background_group()
        if group is None:
            return False

        def stage(staging):
            def gather_and_copy():
                full = doptim.full_state_dict_on_master(optimizer, self.group)
                return staging.stage_tree(full, "optimizer") if full is not None else None

            return collective_step(self.group, f"staging optimizer to {checkpoint}", gather_and_copy)

        self.async_saver.submit(
            stage,
            lambda full: doptim.write_full_on_master(full, checkpoint, opts, group),
            what=f"optimizer to {checkpoint}",
        )
        return True

    def _stage_own_parts(self, staging, state: dict[str, torch.Tensor], spec: WriteSpec, slot: str, what: str):
        """What this rank contributes to the save of ``state`` (see :func:`stage_parts`), as a
        collective step: if one rank fails to copy, every rank raises now, and no background
        thread is left waiting for a peer that never started."""
        writer_of = writer_of_each_key(state, spec, self.group.size)
        return collective_step(
            self.group, f"staging {what}", lambda: stage_parts(staging, state, slot, writer_of, self.group.rank)
        )

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

        def write(state: dict[str, Any], group: Group) -> None:
            save_state(
                state,
                checkpoint,
                spec,
                group,
                owns=model_owned_files(opts.prefix, extra or ()),
                metadata=lambda writer, plan: write_model_metadata(writer, _model_plan(plan), opts, extra_files=extra),
                manifest_extra=self._manifest_extra(),
            )

        state = model_state_to_save(model)
        if use_async and self._submit_background(state, spec, "model", f"model to {checkpoint}", write):
            return
        write(state, self.group)

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
            if use_async and self._submit_full_on_master(optimizer, checkpoint, opts):
                return
            doptim.save_full_on_master(optimizer, checkpoint, opts, self.group)
            return
        flat, description = doptim.flat_optimizer_state(optimizer)
        description = copy.deepcopy(description)  # a background save must not see later hyper-parameter changes

        def write(state: dict[str, Any], group: Group) -> None:
            save_state(
                state,
                checkpoint,
                doptim.optimizer_write_spec(opts),
                group,
                owns=owned_files(prefix),
                metadata=doptim.index_writer(description, prefix),
                manifest_extra=self._manifest_extra(),
            )

        if use_async and self._submit_background(
            flat, doptim.optimizer_write_spec(opts), "optimizer", f"optimizer to {checkpoint}", write
        ):
            return
        write(flat, self.group)

    def _load_optimizer(self, optimizer, checkpoint: str, *, low_cpu_mem_mode, num_threads, verify):
        # Checked and read on every rank first: no rank changes its optimizer unless every rank can.
        load = collective_step(
            self.group,
            f"reading the optimizer from {checkpoint}",
            lambda: self._prepare_optimizer_load(optimizer, checkpoint, verify=verify),
        )
        collective_step(self.group, f"loading the optimizer from {checkpoint}", load)

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
        load = collective_step(
            self.group,
            f"reading the LR scheduler from {checkpoint}",
            lambda: self._prepare_lr_scheduler_load(lr_scheduler, checkpoint),
        )
        collective_step(self.group, f"loading the LR scheduler from {checkpoint}", load)

    # ------------------------------------------------------------------ checking a training checkpoint first
    def _check_model_load(self, model: nn.Module, checkpoint: str, *, strict: bool) -> LoadReport:
        dest = live_tensors(model)
        report = _plan_load(dest, checkpoint, state_aliases(dest), verify=False).report
        if strict and not report.ok:
            raise StateMismatchError(
                f"checkpoint does not fit (strict=True): {report.describe()}", path=checkpoint, report=report
            )
        return report

    def _prepare_optimizer_load(self, optimizer, checkpoint: str, *, verify: bool) -> Callable[[], None]:
        state = doptim.prepare_optimizer_local(optimizer, checkpoint, verify=verify)
        return lambda: apply_optimizer_state(optimizer, state, checkpoint)

    # ------------------------------------------------------------------ inside save_checkpoint
    # ``ckptio.training.save_checkpoint`` stages one folder and calls these on every rank; each
    # returns the records of the files this rank wrote. Failures are raised on all ranks at once.
    def _write_model_into(self, writer, subdir: str, model: nn.Module, opts: ModelSaveOptions) -> list:
        extra = hf_config_files(unwrap_model(model)) if opts.shard else {}
        return self._write_model_state_into(writer, subdir, model_state_to_save(model), opts, extra, self.group)

    def _write_model_state_into(
        self, writer, subdir: str, state: dict[str, Any], opts: ModelSaveOptions, extra: dict, group: Group
    ) -> list:
        """``state`` may be live tensors or a background save's staged parts; ``group`` runs the collectives."""
        plan, records = write_state(state, writer, WriteSpec.for_model(opts), group, subdir=subdir)
        return records + collective_step(
            group,
            "writing the model index",
            lambda: (
                write_model_metadata(writer, _model_plan(plan), opts, subdir=subdir, extra_files=extra)
                if group.rank == 0
                else []
            ),
        )

    def _write_optimizer_into(self, writer, subdir: str, optimizer, opts: OptimizerSaveOptions) -> list:
        return doptim.write_optimizer_into(writer, subdir, optimizer, opts, self.group)
