"""Booster: the user-facing entry point, with ColossalAI's method names and defaults."""

from __future__ import annotations

import os
import weakref
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ckptio.async_io.writer import SaveHandle
from ckptio.checkpoint_io.base import CheckpointIO
from ckptio.checkpoint_io.general import GeneralCheckpointIO
from ckptio.plugins.base import Plugin
from ckptio.plugins.process_group import device_type
from ckptio.state.optimizer import register_model
from ckptio.state.report import KeyMap, LoadReport

PathLike = str | os.PathLike


class Booster:
    """Wraps training objects for a parallel layout and saves/loads their state.

    Without a plugin, ``boost`` returns the objects unchanged (the model moved to ``device``
    when given) and checkpoints are written by one process (the usual single-GPU or hand-made
    data parallel case).
    Every save and load goes through :attr:`checkpoint_io` (the plugin's, or a
    :class:`GeneralCheckpointIO`).

    Args:
        device: without a plugin, where ``boost`` moves the model (``None``: leave it); with a
            plugin it must be this rank's device type (the plugin places the model).
        mixed_precision: must be None: ckptio does not manage mixed precision (use ``torch.autocast``,
            or a plugin's ``precision``).
        plugin: the parallel layout (``TorchDDPPlugin``, ``TorchFSDPPlugin``, ``HybridParallelPlugin``,
            ``LowLevelZeroPlugin``, ``GeminiPlugin``), or None for one process.
    """

    def __init__(self, device: str | None = None, mixed_precision: Any = None, plugin: Plugin | None = None) -> None:
        if mixed_precision is not None:
            raise _mixed_precision_error(mixed_precision, plugin)
        if device is not None and plugin is not None and torch.device(device).type != device_type():
            raise ValueError(
                f"Booster(device={device!r}) with a plugin: {type(plugin).__name__} places the model on this "
                f"rank's device ({device_type()}: its LOCAL_RANK GPU, or the CPU); drop device="
            )
        self.device = device
        self.plugin = plugin
        self.checkpoint_io: CheckpointIO = plugin.get_checkpoint_io() if plugin is not None else GeneralCheckpointIO()
        self._boosted: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def boost(
        self,
        model: nn.Module,
        optimizer: Optimizer | None = None,
        criterion: Any = None,
        dataloader: Any = None,
        lr_scheduler: Any = None,
    ) -> tuple[nn.Module, Optimizer | None, Any, Any, Any]:
        """Wrap the training objects for the plugin; returns them in the same order.

        Also records which model the optimizer trains, so its state is saved by parameter name.
        Without a plugin, ``Booster(device=...)`` moves the model there; an optimizer built on it
        is pointed at the moved parameters (by name) where the move replaced them.

        Args:
            model: the model to train.
            optimizer: its optimizer, built on the unwrapped model (a plugin rebinds it).
            criterion: the loss function, returned unchanged.
            dataloader: returned unchanged.
            lr_scheduler: returned unchanged.

        Returns:
            ``(model, optimizer, criterion, dataloader, lr_scheduler)``.
        """
        if self.plugin is None and self.device is not None and model is not None:
            model = _move(model, optimizer, self.device)
        if self.plugin is not None:
            model, optimizer, criterion, dataloader, lr_scheduler = self.plugin.configure(
                model, optimizer, criterion, dataloader, lr_scheduler
            )
        if optimizer is not None and model is not None:
            register_model(optimizer, model)  # optimizer state is then saved by parameter name
        # an async save's copy runs behind the loop: the optimizer's step and the model's forward
        # wait for the copy of what they modify (and only for that)
        self.checkpoint_io.guard(model, optimizer)
        if model is not None:
            self._boosted.add(model)
        return model, optimizer, criterion, dataloader, lr_scheduler

    def enable_lora(self, model: nn.Module, pretrained_dir: str | None = None, lora_config: Any = None) -> nn.Module:
        """Return ``model`` with LoRA adapters (Hugging Face ``peft``), to pass to :meth:`boost`.

        ``lora_config``: a ``peft.LoraConfig`` for new adapters; or ``pretrained_dir``: a local
        adapter folder (``booster.save_lora_as_pretrained``'s or ``PeftModel.save_pretrained``'s)
        loaded back, trainable. The base model's parameters are frozen, the adapters train. Call
        it before ``boost``, as in ColossalAI: the plugin then shards the adapted model. Works
        with or without a plugin.

        Args:
            model: the base model (not boosted yet).
            pretrained_dir: an adapter folder to load (peft's layout), or None.
            lora_config: a ``peft.LoraConfig`` for new adapters, or None (one of the two is needed).

        Returns:
            The ``peft`` model, to pass to :meth:`boost`.
        """
        from ckptio import lora

        if model in self._boosted or _is_wrapped(model):
            raise ValueError(
                "enable_lora must be called before boost: model = booster.enable_lora(model, lora_config=...), "
                "then booster.boost(model, optimizer, ...) with an optimizer built on the adapted model"
            )
        return lora.enable_lora(model, pretrained_dir, lora_config)

    def save_lora_as_pretrained(self, model: nn.Module, checkpoint: PathLike, use_safetensors: bool = True) -> None:
        """Save the LoRA adapters as peft's folder, which ``peft.PeftModel.from_pretrained`` loads
        (see :meth:`CheckpointIO.save_lora_as_pretrained`); every rank calls it.

        Args:
            model: the model ``enable_lora`` returned (boosted or not).
            checkpoint: the adapter folder, local or an fsspec URL.
            use_safetensors: ``adapter_model.safetensors`` (False: ``adapter_model.bin``).
        """
        self.checkpoint_io.save_lora_as_pretrained(model, checkpoint, use_safetensors)

    def backward(self, loss, optimizer: Optimizer | None = None) -> None:
        """Backpropagate ``loss`` the way the plugin needs (``loss.backward()`` for every plugin here).

        Args:
            loss: the scalar loss tensor.
            optimizer: the boosted optimizer (ColossalAI's signature; unused by these plugins).
        """
        if self.plugin is None:
            loss.backward()
        else:
            self.plugin.backward(loss, optimizer)

    def execute_pipeline(
        self,
        data_iter: Any,
        model: nn.Module,
        criterion: Any,
        optimizer: Optimizer | None = None,
        return_loss: bool = True,
        return_outputs: bool = False,
    ) -> dict[str, Any]:
        """Forward and backward of one batch through the pipeline stages of a plugin that has them
        (``HybridParallelPlugin(pp_size > 1)``: see its ``execute_pipeline``); ColossalAI's call.

        Args:
            data_iter: an iterator of batches; every rank draws the next one.
            model: the boosted model (this rank's stage).
            criterion: ``(logits, labels) -> scalar loss`` of one micro-batch.
            optimizer: the boosted optimizer (not stepped: call ``optimizer.step()`` after).
            return_loss: return the loss (on the last stage).
            return_outputs: return the last stage's outputs.

        Returns:
            ``{"loss": ..., "outputs": ...}`` (None where not asked or not on the last stage).
        """
        run = getattr(self.plugin, "execute_pipeline", None)
        if run is None:
            raise ValueError(
                f"execute_pipeline needs a plugin with pipeline stages (HybridParallelPlugin(pp_size > 1)); "
                f"this booster's plugin is {type(self.plugin).__name__ if self.plugin is not None else None}"
            )
        return run(data_iter, model, criterion, optimizer, return_loss, return_outputs)

    def no_sync(
        self, model: nn.Module | None = None, optimizer: Optimizer | None = None
    ) -> AbstractContextManager[None]:
        """A context in which ``backward()`` accumulates gradients without synchronising them
        (gradient accumulation); the first ``backward()`` after it synchronises.

        DDP: ``model.no_sync()``; FSDP2 (TorchFSDPPlugin, LowLevelZeroPlugin, GeminiPlugin,
        HybridParallelPlugin): ``model.set_requires_gradient_sync(False)`` until the context ends.
        ``optimizer`` is accepted for ColossalAI's signature: the model's wrapper is what syncs.
        Without a plugin a plain model has nothing to synchronise (a DDP or FSDP2 model made by
        hand gets the same treatment as under a plugin).

        Args:
            model: the boosted model whose gradients are not synchronised inside the context.
            optimizer: accepted for ColossalAI's signature (unused).
        """
        if self.plugin is not None:
            return self.plugin.no_sync(model, optimizer)
        from ckptio.plugins.precision import no_sync

        return no_sync(model, wrapped=False)

    def save_model(
        self,
        model: nn.Module,
        checkpoint: PathLike,
        shard: bool = False,
        gather_dtensor: bool = True,
        prefix: str | None = None,
        size_per_shard: int = 1024,
        use_safetensors: bool = False,
        use_async: bool = False,
        *,
        only_trainable: bool = False,
    ) -> SaveHandle:
        """Save the model's weights: one file, or a Hugging Face folder of shards.

        Every rank calls it. The checkpoint appears whole or not at all (a crash leaves the
        previous one); tied tensors are saved once; wrapper prefixes (``module.``) never reach
        the files.

        Args:
            model: the (boosted or plain) model.
            checkpoint: a file path (``shard=False``) or a folder (``shard=True``); local, or an
                fsspec URL such as ``s3://bucket/run/model``.
            shard: write a folder of shards plus an index JSON (and ``config.json`` for a
                ``transformers`` model) instead of one file.
            gather_dtensor: kept for ColossalAI's signature: files always hold full tensors.
            prefix: put into file names as ColossalAI does (``pytorch_model.ema-00001-of-00002.bin``),
                so saves with different prefixes share a folder.
            size_per_shard: the largest shard, in MiB (a bigger tensor gets a shard of its own).
            use_safetensors: safetensors files instead of ``torch.save`` ones (a single-file
                path ending in ``.safetensors`` is safetensors either way).
            use_async: return before the state is copied; the copy and the write run in the
                background. The boosted optimizer's ``step()`` and the boosted model's forward
                wait for the copy of what they modify; anything else that changes the state in
                place calls :meth:`wait_staged` first. :meth:`wait` makes it durable and raises
                its error.
            only_trainable: leave out the frozen parameters (``requires_grad=False``) and record
                which; a strict load then expects them from the model's base weights.

        Returns:
            The save's handle: ``handle.staged.wait()`` (the state may change),
            ``handle.durable.wait()`` (committed); both complete at once for a synchronous save.
        """
        return self.checkpoint_io.save_model(
            model, checkpoint, shard, gather_dtensor, prefix, size_per_shard, use_safetensors, use_async,
            only_trainable=only_trainable,
        )  # fmt: skip

    def load_model(
        self,
        model: nn.Module,
        checkpoint: PathLike,
        strict: bool = True,
        low_cpu_mem_mode: bool = True,
        num_threads: int = 1,
        verify: bool = False,
        *,
        key_map: KeyMap | None = None,
        allow_dtype_cast: bool = True,
    ) -> LoadReport:
        """Load weights saved in any supported layout into ``model`` in place.

        The layout is detected (one file, a folder with an index, a training checkpoint's
        ``modeling/``), keys, shapes and dtypes are checked from the headers before a byte is
        copied, and each rank reads only the part of each tensor it holds.

        Args:
            model: the (boosted or plain) model to load into.
            checkpoint: the file, folder or index JSON, local or a URL.
            strict: raise :class:`StateMismatchError` listing every missing, unexpected or
                mismatched key, before anything is loaded; False loads what fits.
            low_cpu_mem_mode: kept for ColossalAI's signature: loading always streams shard by
                shard into the live tensors.
            num_threads: shard files read at once (2 helps cold loads).
            verify: check every file's checksum against the manifest first.
            key_map: renames checkpoint keys to model keys (a dict, or a function from checkpoint
                key to model key; None drops the key), to load part of a checkpoint or another
                naming (see :meth:`CheckpointIO.load_model`).
            allow_dtype_cast: tensors stored in another dtype are cast to the model's (listed in
                ``report.cast``); False makes any dtype difference a mismatch.

        Returns:
            The :class:`LoadReport` (ColossalAI's returns None): empty when everything fit.
        """
        self.checkpoint_io.load_model(
            model, checkpoint, strict, low_cpu_mem_mode, num_threads, verify,
            key_map=key_map, allow_dtype_cast=allow_dtype_cast,
        )  # fmt: skip
        return self.checkpoint_io.last_load_report

    def save_optimizer(
        self,
        optimizer: Optimizer,
        checkpoint: PathLike,
        shard: bool = False,
        gather_dtensor: bool = True,
        prefix: str | None = None,
        size_per_shard: int = 1024,
        use_async: bool = False,
    ) -> SaveHandle:
        """Save the optimizer's state: one ``torch.save`` file, or a folder of shards.

        Every rank calls it. A folder holds ckptio's layout by default (state tensors by
        parameter name in safetensors shards, groups and scalars in JSON, no pickle); set
        ``booster.checkpoint_io.optimizer_layout = "colossalai"`` for ColossalAI's.

        Args:
            optimizer: the boosted optimizer.
            checkpoint: a file path (``shard=False``) or a folder (``shard=True``), local or a URL.
            shard: write a folder of shards plus an index.
            gather_dtensor: kept for ColossalAI's signature: files always hold full tensors.
            prefix: put into file names, so saves with different prefixes share a folder.
            size_per_shard: the largest shard, in MiB.
            use_async: return before the state is copied, as :meth:`save_model`.

        Returns:
            The save's handle, as :meth:`save_model`.
        """
        return self.checkpoint_io.save_optimizer(
            optimizer, checkpoint, shard, gather_dtensor, prefix, size_per_shard, use_async
        )

    def load_optimizer(
        self,
        optimizer: Optimizer,
        checkpoint: PathLike,
        low_cpu_mem_mode: bool = True,
        num_threads: int = 1,
        verify: bool = False,
    ) -> None:
        """Load optimizer state saved in any supported layout into ``optimizer``.

        Parameters are matched by name (by position when either side has no names); a
        missing parameter, another group count or a shape that differs raises
        :class:`StateMismatchError` before the optimizer changes.

        Args:
            optimizer: the boosted optimizer to load into.
            checkpoint: the file, folder or index JSON, local or a URL.
            low_cpu_mem_mode: kept for ColossalAI's signature.
            num_threads: kept for ColossalAI's signature (the state is read on one thread).
            verify: check every file's checksum against the manifest first.
        """
        self.checkpoint_io.load_optimizer(optimizer, checkpoint, low_cpu_mem_mode, num_threads, verify)

    def save_lr_scheduler(self, lr_scheduler: Any, checkpoint: PathLike) -> None:
        """Save an LR scheduler's ``state_dict()``: JSON when every value allows, else ``torch.save``.

        Args:
            lr_scheduler: the scheduler.
            checkpoint: the file path, local or a URL (a ``.pt``/``.pth``/``.bin`` suffix
                asks for a ``torch.save`` file).
        """
        self.checkpoint_io.save_lr_scheduler(lr_scheduler, checkpoint)

    def load_lr_scheduler(self, lr_scheduler: Any, checkpoint: PathLike) -> None:
        """Load an LR scheduler's state saved by ckptio (JSON or torch) or ColossalAI (torch).

        Args:
            lr_scheduler: the scheduler to load into; the state of another kind of scheduler
                is refused with :class:`StateMismatchError`.
            checkpoint: the file, local or a URL.
        """
        self.checkpoint_io.load_lr_scheduler(lr_scheduler, checkpoint)

    def wait(self) -> None:
        """Block until every async save of this booster is durable; re-raise its error."""
        self.checkpoint_io.wait()

    def wait_staged(self) -> None:
        """Block until the async save in flight has copied the state: call it before changing the
        state in place other than through the boosted optimizer's ``step()`` or the boosted
        model's forward (``model.load_state_dict``, ``p.data.copy_``, an EMA update, a ``stateful=``
        object's tensors). Never raises: a failed save raises from the next save or :meth:`wait`."""
        self.checkpoint_io.wait_staged()


def _mixed_precision_error(mixed_precision: Any, plugin: Plugin | None) -> Exception:
    """Why ``Booster(mixed_precision=...)`` is refused, and what to do instead."""
    if plugin is not None and hasattr(plugin, "precision"):
        return ValueError(
            f"Booster(mixed_precision={mixed_precision!r}): {type(plugin).__name__} sets the precision itself; "
            f"pass precision='bf16' to {type(plugin).__name__}(...) and drop mixed_precision="
        )
    return NotImplementedError(
        f"Booster(mixed_precision={mixed_precision!r}) is not supported: ckptio does not wrap the model or "
        "optimizer for mixed precision. Use precision='bf16' of LowLevelZeroPlugin, GeminiPlugin or "
        "HybridParallelPlugin (bf16 compute, fp32 master weights), or run the forward pass under "
        "torch.autocast(device_type, dtype=torch.bfloat16); for fp16 add torch.amp.GradScaler around backward "
        "and optimizer.step()"
    )


def _is_wrapped(model: nn.Module) -> bool:
    """Whether a plugin already wrapped or sharded ``model`` (DDP, FSDP2, ckptio's wrappers)."""
    if isinstance(model, nn.parallel.DistributedDataParallel) or getattr(model, "_ckptio_wrapper", False):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover (torch without distributed)
        return False
    return isinstance(model, FSDPModule)


def _move(model: nn.Module, optimizer: Optimizer | None, device: str) -> nn.Module:
    """``model.to(device)``; a move that replaces parameter objects (e.g. to another kind of
    tensor) rebinds the optimizer built on the old ones, by name."""
    from ckptio.plugins.fsdp import rebind_optimizer

    old_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    model = model.to(device)
    if optimizer is not None and any(id(p) not in old_names for p in model.parameters()):
        rebind_optimizer(optimizer, old_names, model)
    return model
