"""The CheckpointIO contract behind ``Booster.save_* / load_*``.

Public methods take ColossalAI's argument names and defaults, validate them once, and call
the ``_``-prefixed hooks that the implementation overrides. Every rank calls every public
method (they are collective in distributed plugins). Paths may be local or fsspec URLs:
saves hand the path to the engine, whose commit the storage picks; loads read through
:func:`ckptio.storage.location.readable`.
"""

from __future__ import annotations

import os
import time
import weakref
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ckptio.async_io.staging import StagingOrder, StagingProgress
from ckptio.async_io.writer import AsyncSaver, SaveHandle
from ckptio.formats.naming import check_prefix
from ckptio.layouts.model import MiB, ModelSaveOptions
from ckptio.progress import module_nbytes, track_io
from ckptio.state.report import KeyMap, LoadReport, key_mapper
from ckptio.storage.location import normalize, readable

PathLike = str | os.PathLike


def _check_size_per_shard(size_per_shard: float) -> int:
    if isinstance(size_per_shard, bool) or not isinstance(size_per_shard, int | float) or size_per_shard <= 0:
        raise ValueError(f"size_per_shard is in MiB and must be a positive number, got {size_per_shard!r}")
    return max(1, int(size_per_shard * MiB))


def _check_path(checkpoint: PathLike) -> str:
    if not isinstance(checkpoint, str | os.PathLike) or not os.fspath(checkpoint):
        raise TypeError(f"checkpoint must be a non-empty path, got {checkpoint!r}")
    return normalize(checkpoint)


def _check_threads(num_threads: int) -> int:
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
    return num_threads


class CheckpointIO(ABC):
    """Saves and loads model, optimizer and LR scheduler state for one parallel layout.

    Public methods take ColossalAI's argument names and defaults and are collective: every
    rank calls them. ``last_load_report`` holds the :class:`LoadReport` of the last
    :meth:`load_model`, which returns the model as ColossalAI's does.
    """

    #: the report of the last :meth:`load_model` (missing, unexpected and mismatched keys), which
    #: returns the model as ColossalAI's does; ``Booster.load_model`` returns this report
    last_load_report: LoadReport | None = None

    # ------------------------------------------------------------------ model
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
        """Save model weights: one file at ``checkpoint``, or (``shard=True``) a folder of
        shards of at most ``size_per_shard`` MiB with a Hugging Face index.

        ``only_trainable=True`` leaves out the frozen parameters (``requires_grad=False``; buffers
        are always saved) and records their names, so a strict load into a model that already
        holds them (its base weights) loads the rest and lists them in ``report.frozen_keys``.
        A one-file save needs a ``.safetensors`` path for it (a torch file has nowhere to record
        them).

        Args:
            model: the model (wrapped or not); its tied tensors are saved once.
            checkpoint: the file or folder path, local or an fsspec URL.
            shard: a folder of shards and an index instead of one file.
            gather_dtensor: kept for ColossalAI's signature: files always hold full tensors.
            prefix: goes into file names (``pytorch_model.ema-00001-of-00002.bin``).
            size_per_shard: the largest shard, in MiB.
            use_safetensors: safetensors instead of ``torch.save`` files.
            use_async: return before the state is copied (:meth:`wait_staged`); copy and write
                in the background (:meth:`wait`).
            only_trainable: leave out the frozen parameters and record their names (see above).

        Returns:
            The save's :class:`~ckptio.async_io.writer.SaveHandle` (``staged``, ``durable``).
        """
        started = time.perf_counter()
        opts = ModelSaveOptions(
            shard=bool(shard),
            prefix=check_prefix(prefix),
            max_shard_bytes=_check_size_per_shard(size_per_shard),
            use_safetensors=bool(use_safetensors),
            only_trainable=bool(only_trainable),
        )
        path = _check_path(checkpoint)
        self.wait()  # at most one save in flight: a save never races the previous async one
        with track_io("save model", lambda: module_nbytes(model), direction="write", quiet=bool(use_async)):
            handle = self._save_model(model, path, opts, gather_dtensor=gather_dtensor, use_async=bool(use_async))
        return _timed(handle, started, f"model to {path}")

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
    ) -> nn.Module:
        """Load weights saved in any supported layout into ``model`` in place.

        ``key_map`` renames checkpoint keys to model keys: a dict (keys it does not name keep
        their name) or a function; a key mapped to None is dropped (neither loaded nor
        unexpected), and model keys nothing maps to are missing. It sees each key without a
        wrapper prefix (``module.``) that every key of the checkpoint carries, when dropping
        the prefix makes more mapped keys name model tensors.

        A tensor stored in another dtype than the model's is cast (fp32 <-> bf16, int32 ->
        int64) and listed in ``report.cast``; ``allow_dtype_cast=False`` makes any dtype
        difference a mismatch. Casts that change values (integer <-> floating point, bool,
        narrowing integers) are always mismatches. Tensors on the ``meta`` device are
        materialised on the CPU with the loaded values.

        Args:
            model: the model (wrapped or not) to load into.
            checkpoint: the file, folder or index JSON, local or an fsspec URL.
            strict: a missing, unexpected or mismatched key raises :class:`StateMismatchError`
                (all of them listed) before anything is loaded; False loads what fits.
            low_cpu_mem_mode: kept for ColossalAI's signature: loading always streams shard by
                shard straight into the live tensors, so extra memory stays below one shard.
            num_threads: shard files read at once (each rank reads only its own boxes).
            verify: check every checksum of the manifest first.
            key_map: checkpoint key -> model key (dict or function; None drops a key), as above.
            allow_dtype_cast: cast tensors stored in another dtype (False: a mismatch).

        Returns:
            ``model`` itself, as ColossalAI's ``CheckpointIO.load_model`` does (code written for
            it says ``model = checkpoint_io.load_model(model, path)``); the report of missing,
            unexpected, mismatched and cast keys is :attr:`last_load_report` (empty when all fit).
        """
        num_threads = _check_threads(num_threads)
        key_mapper(key_map)  # a key_map of the wrong type is a TypeError before anything is read
        path = _check_path(checkpoint)
        with (
            track_io("load model", lambda: module_nbytes(model), direction="read"),
            readable(path, ranged=True) as local,
        ):
            self.last_load_report = self._load_model(
                model,
                local,
                strict=bool(strict),
                low_cpu_mem_mode=bool(low_cpu_mem_mode),
                num_threads=num_threads,
                verify=bool(verify),
                key_map=key_map,
                allow_dtype_cast=bool(allow_dtype_cast),
            )
        return model

    # ------------------------------------------------------------------ optimizer
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
        """Save optimizer state: one file, or (``shard=True``) a folder of shards.

        Args:
            optimizer: the optimizer (its parameters' names come from the model it was boosted with).
            checkpoint: the file or folder path, local or an fsspec URL.
            shard: a folder of shards and an index, in :attr:`optimizer_layout`'s layout.
            gather_dtensor: kept for ColossalAI's signature: files always hold full tensors.
            prefix: goes into file names, so saves with different prefixes share a folder.
            size_per_shard: the largest shard, in MiB.
            use_async: return before the state is copied, as :meth:`save_model`.

        Returns:
            The save's handle, as :meth:`save_model`.
        """
        started = time.perf_counter()
        prefix, max_shard_bytes = check_prefix(prefix), _check_size_per_shard(size_per_shard)
        path = _check_path(checkpoint)
        self.wait()
        handle = self._save_optimizer(
            optimizer,
            path,
            shard=bool(shard),
            gather_dtensor=gather_dtensor,
            prefix=prefix,
            max_shard_bytes=max_shard_bytes,
            use_async=bool(use_async),
        )
        return _timed(handle, started, f"optimizer to {path}")

    def load_optimizer(
        self,
        optimizer: Optimizer,
        checkpoint: PathLike,
        low_cpu_mem_mode: bool = True,
        num_threads: int = 1,
        verify: bool = False,
    ) -> None:
        """Load optimizer state saved in any supported layout into ``optimizer``; nothing
        changes unless the saved state fits (names, groups, shapes).

        Args:
            optimizer: the optimizer to load into.
            checkpoint: the file, folder or index JSON, local or an fsspec URL.
            low_cpu_mem_mode: kept for ColossalAI's signature.
            num_threads: kept for ColossalAI's signature: the state is read on one thread.
            verify: check every checksum of the manifest first.
        """
        num_threads = _check_threads(num_threads)
        with readable(_check_path(checkpoint), ranged=True) as local:
            self._load_optimizer(
                optimizer, local, low_cpu_mem_mode=bool(low_cpu_mem_mode), num_threads=num_threads, verify=bool(verify)
            )

    # ------------------------------------------------------------------ lr scheduler
    def save_lr_scheduler(self, lr_scheduler: Any, checkpoint: PathLike) -> None:
        """Save an LR scheduler's ``state_dict()`` (JSON when every value allows).

        Args:
            lr_scheduler: the scheduler.
            checkpoint: the file path (``.pt``/``.pth``/``.bin`` asks for a ``torch.save`` file).
        """
        path = _check_path(checkpoint)
        self.wait()
        self._save_lr_scheduler(lr_scheduler, path)

    def load_lr_scheduler(self, lr_scheduler: Any, checkpoint: PathLike) -> None:
        """Load an LR scheduler's state saved by ckptio or ColossalAI.

        Args:
            lr_scheduler: the scheduler to load into (another scheduler's state is refused).
            checkpoint: the file, local or an fsspec URL.
        """
        with readable(_check_path(checkpoint)) as local:
            self._load_lr_scheduler(lr_scheduler, local)

    # ------------------------------------------------------------------ LoRA
    def save_lora_as_pretrained(self, model: nn.Module, checkpoint: PathLike, use_safetensors: bool = True) -> None:
        """Save the LoRA adapters of ``model`` (made by ``booster.enable_lora``) as peft's folder:
        ``adapter_model.safetensors`` (``.bin`` with ``use_safetensors=False``) and
        ``adapter_config.json``, which ``peft.PeftModel.from_pretrained(base_model, checkpoint)``
        loads; only the adapters are written, from every rank's shards. One atomic commit; other
        files in an existing folder are kept.

        Args:
            model: the model ``booster.enable_lora`` returned (boosted or not).
            checkpoint: the adapter folder, local or an fsspec URL.
            use_safetensors: ``adapter_model.safetensors`` (False: ``adapter_model.bin``; note that
                ColossalAI's default is False).
        """
        path = _check_path(checkpoint)
        self.wait()
        self._save_lora(model, path, use_safetensors=bool(use_safetensors))

    # ------------------------------------------------------------------ async
    @property
    def async_saver(self) -> AsyncSaver:
        """The background writer for ``use_async=True`` saves (created on first use).

        Its staging buffers keep one host copy per kind of state (model, optimizer) alive
        between saves; ``async_saver.release_staging()`` frees them.
        """
        saver = self.__dict__.get("_async_saver")
        if saver is None:
            saver = self.__dict__["_async_saver"] = AsyncSaver()
        return saver

    @property
    def last_save(self) -> SaveHandle | None:
        """The handle of the last async save (``save_checkpoint`` returns a path, not its handle)."""
        saver = self.__dict__.get("_async_saver")
        return saver.handle if saver is not None else None

    def wait(self) -> None:
        """Block until every async save started by this object is durable; re-raise its error."""
        saver = self.__dict__.get("_async_saver")
        if saver is not None:
            saver.wait()

    def wait_staged(self, obj: object = None) -> float:
        """Block until the async save in flight has copied the state, after which it may change in
        place. Never raises (a failed save raises from the next save or :meth:`wait`).

        Args:
            obj: a guarded model or optimizer: wait only for the copy of what it is about to
                modify; None: for the whole state.

        Returns:
            The seconds waited.
        """
        saver = self.__dict__.get("_async_saver")
        return saver.wait_staged(obj) if saver is not None else 0.0

    def guard(self, model: nn.Module | None = None, optimizer: Optimizer | None = None) -> None:
        """Make ``optimizer.step()`` and ``model``'s forward wait for an async save's copy of what
        they modify (the optimizer's parameters and state; the model's buffers, e.g. BatchNorm's
        running statistics), and copy those first. ``Booster.boost`` calls it.

        Args:
            model: the model whose forward waits, or None.
            optimizer: the optimizer whose ``step()`` waits, or None.
        """
        guards = self.__dict__.setdefault("_guards", [])
        for obj, register in (
            (model, lambda o, hook: o.register_forward_pre_hook(hook, prepend=True)),
            (optimizer, lambda o, hook: o.register_step_pre_hook(hook)),
        ):
            if obj is None or any(ref() is obj for ref in guards):
                continue
            guards.append(weakref.ref(obj))
            register(obj, _StagingGuard(self))

    def staging_progress(self) -> StagingProgress:
        """The order of the next async save's copies: the guarded models' buffers first (their
        forward comes first), then each guarded optimizer's parameters and state, then the rest."""
        guarded = [ref() for ref in self.__dict__.get("_guards", [])]
        models = [g for g in guarded if isinstance(g, nn.Module)]
        optimizers = [g for g in guarded if g is not None and not isinstance(g, nn.Module)]
        order = [(m, list(m.buffers())) for m in models] + [(o, _optimizer_tensors(o)) for o in optimizers]
        return StagingProgress(StagingOrder(order))

    # ------------------------------------------------------------------ hooks
    @abstractmethod
    def _save_model(self, model, checkpoint: str, opts: ModelSaveOptions, *, gather_dtensor, use_async) -> None: ...

    @abstractmethod
    def _load_model(
        self, model, checkpoint: str, *, strict, low_cpu_mem_mode, num_threads, verify, key_map, allow_dtype_cast
    ) -> LoadReport: ...

    @abstractmethod
    def _save_lora(self, model, checkpoint: str, *, use_safetensors: bool) -> None: ...

    @abstractmethod
    def _save_optimizer(self, optimizer, checkpoint: str, **kwargs) -> None: ...

    @abstractmethod
    def _load_optimizer(self, optimizer, checkpoint: str, **kwargs) -> None: ...

    @abstractmethod
    def _save_lr_scheduler(self, lr_scheduler, checkpoint: str) -> None: ...

    @abstractmethod
    def _load_lr_scheduler(self, lr_scheduler, checkpoint: str) -> None: ...


def _timed(handle: SaveHandle | None, started: float, what: str) -> SaveHandle:
    """The call's handle, with the time the call itself took (a hook without one gets a complete handle)."""
    handle = handle if isinstance(handle, SaveHandle) else SaveHandle.completed(what)
    handle.call_seconds = time.perf_counter() - started
    return handle


def _optimizer_tensors(optimizer: Optimizer) -> list[torch.Tensor]:
    """What ``optimizer.step()`` modifies: its parameters and every tensor of its state."""
    out = [p for group in optimizer.param_groups for p in group["params"]]
    for state in optimizer.state.values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


class _StagingGuard:
    """The hook ``guard`` installs: waits, in the caller's thread, for the copy of what its model's
    forward or its optimizer's step is about to modify. A pickled or deep-copied model or
    optimizer gets an inert guard (a copy is not the live state of any save)."""

    def __init__(self, io: CheckpointIO | None) -> None:
        self._io = weakref.ref(io) if io is not None else None

    def __call__(self, obj, *args) -> None:
        io = self._io() if self._io is not None else None
        if io is not None:
            io.wait_staged(obj)

    def __reduce__(self):
        return (_StagingGuard, (None,))
