"""Training checkpoints in ColossalChat's layout, saved as one atomic folder.

::

    <save_dir>/epoch-<E>_step-<S>/
        modeling/               the model (sharded safetensors + index, config.json for HF models)
        optimizer/              the optimizer (sharded; layout of ``booster.checkpoint_io.optimizer_layout``)
        lr_scheduler            torch.save(lr_scheduler.state_dict()), the file ColossalAI reads
        running_states.json     {"epoch", "step", "sample_start_index": step * batch_size, ...}
        rng_state/rank_00000.json   one per rank: Python, NumPy, torch CPU and CUDA RNG states
        stateful/<name>.json, stateful/<name>.safetensors   objects passed as stateful= (GradScaler, EMA, ...)
        ckptio_manifest.json    sizes and checksums of everything above

Everything is one save of parts (:mod:`ckptio.engine.save`) committed at once, so a crash
mid-save leaves the previous checkpoint as it was. Every rank calls :func:`save_checkpoint`;
the plugin's CheckpointIO makes the model and optimizer parts (who writes which file), the
master writes the shared files, and every rank writes its own RNG file.
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ckptio.cluster import DistCoordinator
from ckptio.engine.group import Group, agreed_step, collective_step
from ckptio.engine.save import FilesPart, save_parts
from ckptio.errors import CheckpointFormatError, StateMismatchError
from ckptio.formats import naming
from ckptio.formats.hf_index import read_json_file
from ckptio.layouts.detect import detect, training_checkpoints_in
from ckptio.layouts.model import MiB, ModelSaveOptions
from ckptio.layouts.optimizer import OptimizerSaveOptions
from ckptio.state.optimizer import register_model
from ckptio.storage.location import is_url, join, normalize, readable
from ckptio.storage.manifest import read_manifest
from ckptio.storage.verify import check_against_manifest
from ckptio.training import rng
from ckptio.training.foreign import check_foreign
from ckptio.training.resume import warn_if_world_size_changed
from ckptio.training.stateful import check_stateful, prepare_stateful_load, stateful_parts

FORMAT = "ckptio-training"
FORMAT_VERSION = 1
MODEL_DIR = naming.TRAINING_MODEL_DIR
OPTIMIZER_DIR = naming.TRAINING_OPTIMIZER_DIR
LR_SCHEDULER_FILE = naming.TRAINING_LR_SCHEDULER
RUNNING_STATES = naming.RUNNING_STATES


checkpoint_name = naming.checkpoint_name
parse_checkpoint_name = naming.parse_checkpoint_name


def save_json(data: dict[str, Any], file_path: str | os.PathLike) -> None:
    """Write ``data`` as JSON to ``file_path``, atomically (ColossalChat's helper).

    Args:
        data: a JSON-able dict.
        file_path: the file, local or an fsspec URL.
    """
    body = (json.dumps(data, indent=4) + "\n").encode("utf-8")
    save_parts(normalize(file_path), [FilesPart({"json": body}, master_only=False)], Group.of_one(), folder=False)


def load_json(file_path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object (ColossalChat's helper); errors name the file.

    Args:
        file_path: the file, local or an fsspec URL.
    """
    with readable(file_path) as local:
        data = read_json_file(local, what="JSON file")
    if not isinstance(data, dict):
        raise CheckpointFormatError("expected a JSON object", path=file_path)
    return data


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def save_checkpoint(
    save_dir: str | os.PathLike,
    booster: Any,
    model: nn.Module,
    optimizer: Any,
    lr_scheduler: Any,
    epoch: int,
    step: int,
    batch_size: int,
    coordinator: DistCoordinator | None = None,
    *,
    sampler: Any = None,
    size_per_shard: float = 1024,
    use_safetensors: bool = True,
    use_async: bool = False,
    extra_states: dict[str, Any] | None = None,
    stateful: Mapping[str, Any] | None = None,
    only_trainable: bool = False,
    reuse_unchanged: bool = True,
) -> Path:
    """Save model, optimizer, scheduler, position and RNG to ``save_dir/epoch-E_step-S``.

    ColossalChat's positional signature; ``step`` counts steps within ``epoch`` and
    ``batch_size`` is per rank, so ``sample_start_index = step * batch_size``. Every rank
    calls it. ``sampler`` (a :class:`StatefulDistributedSampler`) and ``extra_states``
    (JSON values) are stored in ``running_states.json``. ``stateful``: objects with
    ``state_dict()`` / ``load_state_dict()`` by name (a ``GradScaler``, an EMA, a data loader),
    each saved as its state (tensors in safetensors, the rest as JSON, see
    :mod:`ckptio.training.stateful`) and restored by :func:`load_checkpoint` given the same
    names. ``use_async=True`` returns before the state is copied: the
    copy (on several ranks, each rank's own parts), then the folder, are written and committed in
    the background (``booster.wait()`` makes it durable; ``booster.checkpoint_io.last_save`` is
    the save's handle). The boosted optimizer's ``step()`` and model's forward wait for the copy
    of what they modify; call ``booster.wait_staged()`` before changing anything else in place
    (``stateful`` objects' tensors included). Returns the path.
    An existing ``epoch-E_step-S`` folder is replaced atomically, whichever run wrote it
    (:class:`ckptio.CheckpointManager` is what refuses to overwrite another run's checkpoints).

    ``only_trainable=True`` writes only the parameters that train (a LoRA run's adapters, the
    unfrozen half of a model): the frozen ones are named in ``modeling/``'s index and come back
    from the base weights, so load the base model first, then :func:`load_checkpoint` (see
    :meth:`ckptio.checkpoint_io.base.CheckpointIO.save_model`). Otherwise frozen parameters are
    saved in shards of their own, and with ``reuse_unchanged`` (the default, local folders) every
    weights file whose bytes the newest other checkpoint in ``save_dir`` (or the folder being
    replaced) already holds is hard-linked from it instead of written: each checkpoint stays a
    complete folder, and deleting one leaves the others whole (:mod:`ckptio.storage.reuse`).

    Args:
        save_dir: the run's folder, local or an fsspec URL.
        booster: the Booster whose CheckpointIO writes the parts.
        model: the boosted model (saved sharded, in ``modeling/``).
        optimizer: its optimizer, or None (saved in ``optimizer/``).
        lr_scheduler: its scheduler, or None (saved as ``lr_scheduler``).
        epoch: the epoch the loop is in.
        step: the step within the epoch.
        batch_size: the batch size per rank.
        coordinator: the ranks saving together (default: the default group's).
        sampler: a :class:`StatefulDistributedSampler` whose state is saved.
        size_per_shard: the largest shard, in MiB.
        use_safetensors: safetensors model shards (``torch.save`` ones when False).
        use_async: return before the state is copied; copy, write and commit in the background.
        extra_states: JSON values stored in ``running_states.json`` under ``extra_states``.
        stateful: ``{name: object}`` with ``state_dict``/``load_state_dict`` (an EMA, a data
            loader), saved under ``stateful/<name>`` and restored by :func:`load_checkpoint`.
        only_trainable: write only the parameters that train (see above).
        reuse_unchanged: hard-link weights files whose bytes an earlier checkpoint already holds.

    Returns:
        The checkpoint's path (a URL for a URL ``save_dir``).
    """
    started = time.perf_counter()
    epoch, step, batch_size = _check_int("epoch", epoch), _check_int("step", step), _check_int("batch_size", batch_size)
    stateful = check_stateful(stateful)
    coordinator = coordinator or DistCoordinator()
    group = Group(getattr(coordinator, "group", None))
    io = booster.checkpoint_io
    io.wait()
    if optimizer is not None:
        register_model(optimizer, model)
    max_bytes = max(1, int(size_per_shard * MiB))
    model_opts = ModelSaveOptions(
        shard=True, max_shard_bytes=max_bytes, use_safetensors=use_safetensors, only_trainable=bool(only_trainable)
    )
    optim_opts = OptimizerSaveOptions(shard=True, max_shard_bytes=max_bytes, layout=io.optimizer_layout)
    running: dict[str, Any] = {
        "epoch": epoch,
        "step": step,
        "sample_start_index": step * batch_size,
        "batch_size": batch_size,
        "world_size": group.size,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
    }
    if sampler is not None and hasattr(sampler, "state_dict"):
        # The sampler only knows where its current pass started; the data position is step * batch_size.
        running["sampler"] = {**sampler.state_dict(), "start_index": step * batch_size}
    if extra_states:
        running["extra_states"] = extra_states
    running_bytes = (json.dumps(running, indent=4) + "\n").encode("utf-8")

    target = join(normalize(save_dir), checkpoint_name(epoch, step))
    parts = [io.model_part(model, model_opts, subdir=MODEL_DIR)]
    if optimizer is not None:
        parts.append(io.optimizer_part(optimizer, optim_opts, subdir=OPTIMIZER_DIR))
    if lr_scheduler is not None:
        parts.append(io.lr_scheduler_part(lr_scheduler, LR_SCHEDULER_FILE))
    parts += stateful_parts(stateful, io.group)
    parts.append(FilesPart({rng.rng_file_name(group.rank): rng.rng_state_bytes(group.rank)}, master_only=False))
    parts.append(FilesPart({RUNNING_STATES: running_bytes}, master_only=True))
    reuse = _previous_checkpoint(save_dir, target) if reuse_unchanged else None
    # use_async: booster.wait() makes it durable; its handle is io.last_save
    handle = io.save_parts(
        target, parts, folder=True, group=group, use_async=use_async, what=f"training checkpoint {target}",
        reuse=reuse,
    )  # fmt: skip
    handle.call_seconds = time.perf_counter() - started
    return target if is_url(target) else Path(target)


def _previous_checkpoint(save_dir: str | os.PathLike, target: str) -> list[str]:
    """The checkpoint a save in ``save_dir`` links its unchanged files from: the newest other
    ``epoch-E_step-S`` folder there (none for a URL)."""
    if is_url(normalize(save_dir)):
        return []
    others = [p for p in training_checkpoints_in(normalize(save_dir)) if os.path.abspath(p) != os.path.abspath(target)]
    return [str(others[-1])] if others else []


def load_checkpoint(
    load_dir: str | os.PathLike,
    booster: Any,
    model: nn.Module | None,
    optimizer: Any,
    lr_scheduler: Any,
    *,
    sampler: Any = None,
    strict: bool = True,
    verify: bool = False,
    restore_rng: bool = True,
    stateful: Mapping[str, Any] | None = None,
) -> tuple[int, int, int]:
    """Load a checkpoint folder written by :func:`save_checkpoint` (or by ColossalChat), or the
    training folder of another tool: a ``transformers.Trainer`` ``checkpoint-N/`` or an
    ``accelerate`` ``save_state`` folder (:mod:`ckptio.training.foreign` says what is read from
    them, and how their position is derived).

    Returns ``(epoch, step, sample_start_index)``. Restores model, optimizer and scheduler (any
    of them may be None: the others still load, as in ColossalChat), this rank's RNG states
    (when the checkpoint has them; ``restore_rng=False`` skips), ``sampler``'s state when given
    and saved, and each object of ``stateful`` (by the names it was saved with; saved objects
    not asked for are ignored). ``verify=True`` checks every file's checksum against the
    manifest first. Every rank calls it.

    Nothing changes until every part has passed its checks on every rank: running states, the
    sampler's state, the manifest, this rank's RNG file, the LR scheduler file against the live
    scheduler, each stateful object's files against its live state, the model's fit and the
    optimizer's fit (its state is read into memory here, before the model loads). A refused part
    raises before the live model, optimizer, scheduler, sampler, stateful objects or RNG change;
    on several ranks every rank raises the same error: ``StateMismatchError`` when the checkpoint
    does not fit the job (on any rank), else the kind of damage found.

    Args:
        load_dir: the ``epoch-E_step-S`` folder (or another tool's training folder), local or an fsspec URL.
        booster: the Booster whose CheckpointIO reads the parts.
        model: the boosted model to load into.
        optimizer: its optimizer, or None (not loaded).
        lr_scheduler: its scheduler, or None (not loaded).
        sampler: a :class:`StatefulDistributedSampler` to restore, when its state was saved.
        strict: a model that does not fit raises (False: load what fits).
        verify: check every file's checksum against the manifest first.
        restore_rng: put back this rank's Python, NumPy, torch CPU and CUDA generators.
        stateful: objects with ``state_dict``/``load_state_dict`` saved by ``save_checkpoint(stateful=...)``,
            by the names they were saved with.

    Returns:
        ``(epoch, step, sample_start_index)``.
    """
    with readable(load_dir, ranged=True) as local:
        return _load_checkpoint(
            Path(local), booster, model, optimizer, lr_scheduler,
            sampler=sampler, strict=strict, verify=verify, restore_rng=restore_rng, stateful=check_stateful(stateful),
        )  # fmt: skip


def _load_checkpoint(
    load_dir: Path, booster, model, optimizer, lr_scheduler, *, sampler, strict, verify, restore_rng, stateful
) -> tuple[int, int, int]:
    io = booster.checkpoint_io
    group = io.group if isinstance(getattr(io, "group", None), Group) else Group(getattr(io, "group", None))
    if optimizer is not None and model is not None:
        register_model(optimizer, model)
    checked = agreed_step(
        group,
        f"checking {load_dir} before loading it",
        lambda: _check_everything(
            load_dir, io, model, optimizer, lr_scheduler, sampler, strict, verify, restore_rng, stateful
        ),
        precedence=(StateMismatchError,),
    )
    if model is not None:
        booster.load_model(model, checked.model_path, strict=strict)
    collective_step(
        group,
        f"loading the optimizer, LR scheduler, sampler, stateful objects and RNG of {load_dir}",
        checked.load_rest,
    )
    if checked.rng_missing is not None:
        # we wrote one per rank, so its absence means a damaged folder: say the run will not be bit-exact
        warnings.warn(
            f"{checked.rng_missing}: RNG state file is missing; random streams keep their current state, "
            "so the resumed run will not repeat the uninterrupted one exactly",
            UserWarning,
            stacklevel=3,
        )
    for note in checked.notes:
        warnings.warn(f"{load_dir}: {note}", UserWarning, stacklevel=3)
    warn_if_world_size_changed(checked.running, DistCoordinator().world_size, where=str(load_dir))
    return checked.position


@dataclass
class _Checked:
    """What the checks of a training checkpoint found: where it stands, and the loads still to do."""

    running: dict[str, Any]
    position: tuple[int, int, int]
    loads: list[Callable[[], None]]
    rng_missing: Path | None
    model_path: Path
    notes: tuple[str, ...] = ()

    def load_rest(self) -> None:
        for load in self.loads:
            load()


def _check_everything(
    load_dir: Path,
    io: Any,
    model,
    optimizer,
    lr_scheduler,
    sampler,
    strict: bool,
    verify: bool,
    restore_rng: bool,
    stateful: dict[str, Any],
) -> _Checked:
    """Every check of :func:`load_checkpoint` on this rank, cheapest first; changes nothing.

    Returns the loads of optimizer, scheduler, sampler, stateful objects and RNG (the model is
    loaded by the booster).
    """
    located = detect(load_dir, "training")  # a folder left aside by a crash is put back; a non-checkpoint is refused
    if located.layout != "training":  # another tool's folder
        found = check_foreign(
            located, io, model, optimizer, lr_scheduler, sampler, strict, verify, restore_rng, stateful
        )
        running = {} if found.world_size is None else {"world_size": found.world_size}
        return _Checked(running, found.position, found.loads, found.rng_missing, found.model_path, tuple(found.notes))
    running_path = load_dir / RUNNING_STATES
    running = load_json(running_path)
    try:
        epoch, step, start = (_check_int(k, running[k]) for k in ("epoch", "step", "sample_start_index"))
    except (KeyError, ValueError) as exc:
        raise CheckpointFormatError(
            f"{RUNNING_STATES} needs epoch, step and sample_start_index: {exc}", path=running_path
        ) from exc
    loads: list[Callable[[], None]] = []
    sampler_state = running.get("sampler")
    if sampler is not None and isinstance(sampler_state, dict):
        try:  # on a shallow copy: a state the live sampler refuses does not fit the job, like a scheduler's
            copy.copy(sampler).load_state_dict(sampler_state)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateMismatchError(f"the sampler refused its saved state: {exc}", path=running_path) from exc
        loads.append(lambda: sampler.load_state_dict(sampler_state))
    manifest = read_manifest(load_dir)
    if manifest is not None:
        check_against_manifest(load_dir, list(manifest.files), checksums=verify)
    rng_missing = None
    if restore_rng:
        rank = DistCoordinator().rank
        rng_path = load_dir / rng.rng_file_name(rank)
        if rng_path.is_file():
            state = read_json_file(rng_path, what="RNG state file")
            loads.append(rng.prepare_rng_restore(state, path=str(rng_path)))
        elif running.get("format") == FORMAT and running.get("world_size") == DistCoordinator().world_size:
            rng_missing = rng_path
    if lr_scheduler is not None:
        loads.insert(0, io.prepare_lr_scheduler_load(lr_scheduler, str(load_dir / LR_SCHEDULER_FILE)))
    loads += [prepare_stateful_load(load_dir, name, obj) for name, obj in stateful.items()]
    if model is not None:
        io.check_model_load(model, str(load_dir / MODEL_DIR), strict=strict)
    if optimizer is not None:  # last: it reads the optimizer's state
        loads.insert(0, io.prepare_optimizer_load(optimizer, str(load_dir / OPTIMIZER_DIR), verify=False))
    return _Checked(running, (epoch, step, start), loads, rng_missing, load_dir / MODEL_DIR)
