"""The CheckpointIO of every layout: one engine, whatever the number of ranks.

:class:`GeneralCheckpointIO` runs the engine (:mod:`ckptio.engine`) on a private world of
one: a plugin-less ``Booster`` in one process, or on the master alone of a multi-rank job.
:class:`~ckptio.checkpoint_io.distributed.DistributedCheckpointIO` is the same class on a
process group. Every save is a list of parts written into one commit
(:func:`ckptio.engine.save.save_parts`); ``use_async=True`` takes references to the same parts'
live tensors, then copies and writes them on a background thread
(:meth:`GeneralCheckpointIO.save_parts`), so sync and async, one rank and many, local and URL
share one code path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist
from torch import nn

from ckptio.async_io.writer import SaveHandle
from ckptio.checkpoint_io.base import CheckpointIO
from ckptio.engine.group import Group, collective_step
from ckptio.engine.load import load_state, match_files
from ckptio.engine.optimizer import (
    apply_optimizer_load,
    check_restorable_layout,
    flat_optimizer_state,
    full_state_dict_on_master,
    unheld_parameters,
    union_description,
)
from ckptio.engine.optimizer import prepare_optimizer_load as read_optimizer_state
from ckptio.engine.save import CallbackPart, FilesPart, Part, TensorPart, request_stages, save_parts, stage_all
from ckptio.errors import CheckpointError, StateMismatchError
from ckptio.formats import colossal_optim
from ckptio.formats import extra_state as extra_state_format
from ckptio.layouts import lr_scheduler as lr_scheduler_layout
from ckptio.layouts.detect import detect
from ckptio.layouts.lr_scheduler import scheduler_file_bytes
from ckptio.layouts.model import ModelSaveOptions, model_metadata, model_owned_files
from ckptio.layouts.optimizer import (
    OptimizerSaveOptions,
    index_metadata,
    owned_files,
    single_file_format,
    write_full,
)
from ckptio.state.hf_config import hf_config_files
from ckptio.state.model import (
    extra_state_modules,
    frozen_keys,
    live_state,
    model_state_to_save,
    tied_aliases,
    unwrap_model,
)
from ckptio.state.report import LoadReport


class GeneralCheckpointIO(CheckpointIO):
    """Saves and loads on this process alone (a world of one), with the multi-rank engine.

    ``use_async=True`` returns at once; a background thread copies the state into reused host
    buffers (the boosted optimizer's ``step()`` and model's forward wait for the copies of what
    they modify), then writes and commits it (``booster.wait()`` makes it durable). The ``*_part`` methods
    and :meth:`save_parts` are the extension points of a plugin's CheckpointIO and of
    ``ckptio.training.save_checkpoint``; the ``check_*`` / ``prepare_*`` ones check a load
    without changing anything. ``optimizer_layout`` (``"ckptio"`` or ``"colossalai"``) picks the
    layout of sharded optimizer saves; loads detect it.
    """

    #: Layout of sharded optimizer saves: "ckptio" (parameter names, safetensors + JSON, the
    #: default) or "colossalai" (ColossalAI's pytorch_optim.bin.index.json layout). Loading
    #: detects the layout. Set it on the instance: ``booster.checkpoint_io.optimizer_layout = "colossalai"``.
    optimizer_layout: str = "ckptio"
    #: Whether the ranks hold different keys (pipeline stages, expert shards): saves write the
    #: union of every rank's keys, loads fill each rank's keys and judge the whole model's fit.
    keys_differ: bool = False

    def __init__(self) -> None:
        self.group = Group.of_one()
        #: how the saving job was laid out (plugin, mesh, torch version): recorded in each
        #: folder's manifest for inspection, never required to match on load
        self.layout: dict[str, Any] | None = None
        self._background: Group | None = None

    # ------------------------------------------------------------------ parts of a save
    # ``ckptio.training.save_checkpoint`` builds a training checkpoint from these parts; they are
    # public so a plugin's CheckpointIO can change what a part is without touching the commit.
    def model_part(
        self, model: nn.Module, opts: ModelSaveOptions, *, subdir: str = "", checkpoint=None, extra_files=None
    ) -> Part:
        """The model's weights (tied tensors once) and modules' extra state, plus the index and
        ``extra_files`` of a sharded save (default: ``config.json`` and ``generation_config.json``
        of a ``transformers`` model). Extra state that is not a tensor is encoded now, so a value
        that cannot be saved raises before anything is written.

        Frozen parameters (``requires_grad=False``) go into shards of their own, which the next
        save links instead of rewriting while they stay unchanged; ``opts.only_trainable``
        leaves them out and names them in the index (or the one file).

        Args:
            model: the model whose state is saved.
            opts: the file options (one file or shards, prefix, shard size, format).
            subdir: the folder inside the commit (``modeling`` in a training checkpoint).
            checkpoint: the target path, for a one-file save's format by suffix and for errors.
            extra_files: ``{name: bytes}`` written beside the shards by the master.
        """
        if extra_files is None and opts.shard:
            extra_files = hf_config_files(unwrap_model(model))
        frozen = frozen_keys(model)
        tensors, extra = model_state_to_save(model, only_trainable=opts.only_trainable)
        encoded = extra_state_format.encode(extra, path=checkpoint) if extra else None
        return TensorPart(
            tensors,
            opts.write_spec(checkpoint, encoded, frozen),
            self.group,
            subdir=subdir,
            metadata=model_metadata(opts, extra_files, encoded, frozen) if opts.shard else None,
            slot="model",
            master_only=self.group.solo,
            static=frozenset(frozen),
            keys_differ=self.keys_differ,
        )

    def optimizer_part(self, optimizer, opts: OptimizerSaveOptions, *, subdir: str = "", checkpoint=None) -> Part:
        """The optimizer's state as a part: ckptio's sharded layout goes through the engine like
        weights; one file and ColossalAI's layout are gathered whole on the master, which writes them.

        Args:
            optimizer: the optimizer whose state is saved.
            opts: the layout, prefix and shard size.
            subdir: the folder inside the commit (``optimizer`` in a training checkpoint).
            checkpoint: the target path, for errors (a one-file safetensors save checks the state first).
        """
        if opts.shard and opts.layout == "ckptio":
            flat, description = flat_optimizer_state(optimizer)
            description = copy.deepcopy(description)  # the hyper-parameters of now, not after the next step
            if self.keys_differ:
                description = union_description(description, self.group)
            return TensorPart(
                flat,
                opts.write_spec(),
                self.group,
                subdir=subdir,
                metadata=index_metadata(description, opts.prefix),
                slot="optimizer",
                master_only=self.group.solo,
                keys_differ=self.keys_differ,
            )
        if self.keys_differ:
            raise CheckpointError(
                "each rank's optimizer holds different parameters (pipeline stages): save it with shard=True "
                "in the ckptio layout (one file and ColossalAI's layout gather one rank's optimizer whole)",
                path=checkpoint,
            )
        check_restorable_layout(optimizer)  # before any collective: the same verdict on every rank
        if not opts.shard and opts.single_file == "safetensors":
            colossal_optim.check_flat(optimizer.state_dict(), path=checkpoint)
        return CallbackPart(
            lambda group: full_state_dict_on_master(optimizer, group),
            lambda writer, file_name, full: write_full(writer, file_name, full, opts, subdir),
            self.group,
            slot="optimizer",
            master_only=self.group.solo,
        )

    def lr_scheduler_part(self, lr_scheduler, name: str, *, checkpoint=None) -> Part:
        """The scheduler's state as one small ``torch.save`` file, written by the master (every rank
        holds the same).

        Args:
            lr_scheduler: the scheduler.
            name: the file's name inside the commit.
            checkpoint: the target path, named in errors (a state ``torch.load`` would refuse).
        """
        data = scheduler_file_bytes(lr_scheduler.state_dict(), path=checkpoint or name)
        return FilesPart({name: data}, master_only=True)

    def manifest_extra(self) -> dict[str, Any] | None:
        """What this IO adds to each folder's manifest: the saving job's layout, when known."""
        return {"layout": self.layout} if self.layout else None

    # ------------------------------------------------------------------ the commit, sync or async
    def background_group(self, group: Group) -> Group | None:
        """The group a background save of ``group``'s parts runs its collectives on, or None where
        an async save must stay synchronous.

        Args:
            group: the group the parts were built on.

        A world of one needs no group. Otherwise a gloo group of its own, created at the first
        async save (``new_group`` is entered by every rank of the world, so only for the default
        group), so background collectives never interleave with training's.
        """
        if not group.active:
            return Group.of_one()
        if not group.is_default or (self.group.active and not self.group.is_default):
            return None
        if self._background is None:
            self._background = Group(dist.new_group(backend="gloo"))
        return self._background

    def save_parts(
        self,
        checkpoint: str,
        parts: list[Part],
        *,
        folder: bool,
        owns=None,
        group: Group | None = None,
        use_async: bool = False,
        what: str = "checkpoint",
        reuse: Sequence[str] | None = (),
    ) -> SaveHandle:
        """Write ``parts`` into one commit of ``checkpoint`` over ``group`` (default: this IO's).

        Args:
            checkpoint: the target path or URL.
            parts: what the save writes (:meth:`model_part`, :meth:`optimizer_part`, ...).
            folder: a folder commit (False: exactly one part writes exactly one file).
            owns: which entries of an existing folder the save replaces (the rest are kept).
            group: the group the parts' collectives run on.
            use_async: copy and write in the background.
            what: how messages name the save.
            reuse: committed folders whose unchanged files may be linked instead of written (see
                :func:`ckptio.engine.save.save_parts`); None: none.

        ``use_async``: take references to the live tensors now, copy and write them on the
        background thread; stays synchronous when a part cannot be staged without collectives on
        its mesh (``Partial`` placements, strided shards) or no background group can exist (a
        plugin on a subgroup). Every rank reaches the same answer.

        Returns:
            The save's handle (completed at once for a synchronous save).
        """
        group = group or self.group
        extra = self.manifest_extra()
        background = self.background_group(group) if use_async else None
        if background is None or not all(p.stageable() for p in parts):
            save_parts(checkpoint, parts, group, folder=folder, owns=owns, manifest_extra=extra, reuse=reuse)
            return SaveHandle.completed(what)
        self.async_saver.wait()  # the previous save's buffers are free and its error raised before anything starts
        requests = request_stages(parts, group, background, what)
        progress = self.staging_progress()
        return self.async_saver.submit(
            lambda staging: stage_all(requests, staging, background, what, progress),
            lambda staged: save_parts(
                checkpoint, staged, background, folder=folder, owns=owns, manifest_extra=extra, reuse=reuse
            ),
            what=what,
            progress=progress,
        )

    # ------------------------------------------------------------------ model
    def _save_model(self, model: nn.Module, checkpoint: str, opts: ModelSaveOptions, *, gather_dtensor, use_async):
        extra = hf_config_files(unwrap_model(model)) if opts.shard else {}
        part = self.model_part(model, opts, checkpoint=checkpoint, extra_files=extra)
        owns = model_owned_files(opts.prefix, extra)
        return self.save_parts(checkpoint, [part], folder=opts.shard, owns=owns, use_async=use_async,
                               what=f"model to {checkpoint}")  # fmt: skip

    def _load_model(
        self, model: nn.Module, checkpoint: str, *, strict, low_cpu_mem_mode, num_threads, verify, key_map,
        allow_dtype_cast,
    ):  # fmt: skip
        dest = live_state(model)
        report: LoadReport = load_state(
            dest, checkpoint, self.group, strict=strict, aliases=tied_aliases(dest), verify=verify,
            num_threads=num_threads, key_map=key_map, allow_dtype_cast=allow_dtype_cast,
            extra=extra_state_modules(model), keys_differ=self.keys_differ,
        )  # fmt: skip
        return report

    def _save_lora(self, model: nn.Module, checkpoint: str, *, use_safetensors: bool) -> None:
        from ckptio import lora

        parts = lora.adapter_parts(model, self.group, use_safetensors=use_safetensors)
        owns = lora.adapter_files(model)
        self.save_parts(checkpoint, parts, folder=True, owns=owns, what=f"adapters to {checkpoint}")

    # ------------------------------------------------------------------ optimizer
    def _save_optimizer(self, optimizer, checkpoint: str, *, shard, gather_dtensor, prefix, max_shard_bytes, use_async):
        opts = OptimizerSaveOptions(
            shard, prefix, max_shard_bytes, self.optimizer_layout, single_file_format(checkpoint)
        )
        part = self.optimizer_part(optimizer, opts, checkpoint=checkpoint)
        return self.save_parts(checkpoint, [part], folder=shard, owns=owned_files(prefix), use_async=use_async,
                               what=f"optimizer to {checkpoint}")  # fmt: skip

    def _load_optimizer(self, optimizer, checkpoint: str, *, low_cpu_mem_mode, num_threads, verify):
        # Checked and read on every rank first: no rank changes its optimizer unless every rank can.
        load = collective_step(
            self.group,
            f"reading the optimizer from {checkpoint}",
            lambda: self.prepare_optimizer_load(optimizer, checkpoint, verify=verify),
        )
        if self.keys_differ:  # each rank checked its own parameters; none may be left over
            unheld = unheld_parameters(optimizer, detect(checkpoint, "optimizer"), self.group)
            if unheld:
                raise StateMismatchError(
                    f"optimizer checkpoint does not fit the optimizer: no rank's optimizer holds {unheld[:5]}"
                    + (f" ({len(unheld)} in all)" if len(unheld) > 5 else ""),
                    path=checkpoint,
                )
        collective_step(self.group, f"loading the optimizer from {checkpoint}", load)

    # ------------------------------------------------------------------ lr scheduler
    def _save_lr_scheduler(self, lr_scheduler, checkpoint: str) -> None:
        part = self.lr_scheduler_part(lr_scheduler, "lr_scheduler", checkpoint=checkpoint)
        self.save_parts(checkpoint, [part], folder=False)

    def _load_lr_scheduler(self, lr_scheduler, checkpoint: str) -> None:
        load = collective_step(
            self.group,
            f"reading the LR scheduler from {checkpoint}",
            lambda: self.prepare_lr_scheduler_load(lr_scheduler, checkpoint),
        )
        collective_step(self.group, f"loading the LR scheduler from {checkpoint}", load)

    # ------------------------------------------------------------------ checking before loading
    # ``ckptio.training.load_checkpoint`` checks every part on every rank before it loads any
    # (one verdict for all ranks), so a refused part leaves the live objects as they were. These
    # change nothing and run no collectives; the ``prepare_*`` ones return the call that loads.
    def check_model_load(
        self, model: nn.Module, checkpoint: str, *, strict: bool, key_map=None, allow_dtype_cast: bool = True
    ) -> LoadReport:
        """The fit of a model checkpoint to ``model`` from the headers alone; changes nothing.

        Args:
            model: the live model.
            checkpoint: a local path.
            strict: raise :class:`StateMismatchError` when anything does not fit.
            key_map: checkpoint key -> model key (a dict, or a function; None drops a key).
            allow_dtype_cast: cast tensors stored in another dtype (False: a mismatch).
        """
        dest = live_state(model)
        report = match_files(
            detect(checkpoint, "model"), dest, tied_aliases(dest), key_map=key_map,
            allow_dtype_cast=allow_dtype_cast, extra=extra_state_modules(model),
        ).report  # fmt: skip
        if self.keys_differ:  # other ranks take the keys this one lacks (checked by a collective load only)
            report.unexpected_keys.clear()
        if strict and not report.ok:
            raise StateMismatchError(
                f"checkpoint does not fit the model (strict=True): {report.describe()}", path=checkpoint, report=report
            )
        return report

    def prepare_optimizer_load(self, optimizer, checkpoint: str, *, verify: bool) -> Callable[[], None]:
        """Read and check this rank's optimizer state; returns the call that loads it.

        Args:
            optimizer: the live optimizer.
            checkpoint: a local path.
            verify: check every checksum of the manifest first.
        """
        located = detect(checkpoint, "optimizer")
        state = read_optimizer_state(optimizer, located, verify=verify, partial=self.keys_differ)
        return lambda: apply_optimizer_load(optimizer, state, checkpoint)

    def prepare_lr_scheduler_load(self, lr_scheduler, checkpoint: str) -> Callable[[], None]:
        """Read and check a scheduler file against ``lr_scheduler``; returns the call that loads it.

        Args:
            lr_scheduler: the live scheduler.
            checkpoint: a local path.
        """
        return lr_scheduler_layout.prepare_lr_scheduler_load(lr_scheduler, checkpoint)
