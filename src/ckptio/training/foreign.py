"""Training folders written by other tools, for :func:`ckptio.training.load_checkpoint`.

Users arrive with the checkpoints their trainer wrote; loading them where ckptio's own load
does lets a job move over with one call, and the next save is ckptio's. Two layouts
(:func:`ckptio.layouts.detect.detect` tells them apart):

* ``hf-trainer``: ``transformers.Trainer``'s ``checkpoint-N/``: the model as ``save_pretrained``
  writes it (``model.safetensors``, sharded with an index, or ``pytorch_model.bin``),
  ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth`` (``rng_state_<i>.pth`` per process on
  several), ``trainer_state.json``; ``training_args.bin`` (a pickled ``TrainingArguments``
  object) is never read.
* ``accelerate``: ``Accelerator.save_state(dir)``: ``model.safetensors`` or
  ``pytorch_model.bin``, ``optimizer.bin``, ``scheduler.bin``, ``random_states_<i>.pkl`` per
  process (despite the name, ``torch.save`` files). Only the first model, optimizer and
  scheduler (files without ``_1``...); samplers, ``scaler.pt`` and ``custom_checkpoint_<i>.pkl``
  are not read.

Every pickle goes through ``torch.load(weights_only=True)``; the RNG files hold
``np.random.get_state()``, so for them NumPy arrays are allowed too (the globals that rebuild
an array of numbers, what transformers and accelerate allow themselves), and nothing else. The
optimizer files keep torch's positional ids: they load by position, so the live optimizer must
have the same param groups with the same parameters in the same order (Trainer's default
optimizer has two: parameters with weight decay, then those without).

Where the run stood, ``(epoch, step, sample_start_index)`` in ckptio's meaning (``step``
counts optimizer steps within ``epoch``; ``sample_start_index`` the samples of this rank's
share that epoch already consumed):

* ``hf-trainer``: ``trainer_state.json`` has ``global_step`` (optimizer steps since the start),
  ``epoch`` (a float: the epochs done plus the fraction of the current epoch's batches) and
  ``train_batch_size`` (per process). ``epoch`` is its integer part; ``step`` is
  ``global_step`` less the steps of the finished epochs, which is ``global_step`` itself in
  the first epoch and ``global_step - epoch * round(global_step / epoch_float)`` after (the
  steps per epoch are not recorded). ``sample_start_index = step * train_batch_size``. Both are
  exact without gradient accumulation; with it (``gradient_accumulation_steps`` lives only in
  ``training_args.bin``) a step consumes that many batches, so multiply the sample index by it,
  and the steps per epoch may be off by one when the batches do not divide evenly.
* ``accelerate``: nothing in the folder records it (the ``step`` in ``random_states_<i>.pkl``
  counts gradient-accumulation micro-steps, reset each epoch), so ``(0, 0, 0)`` comes back with
  a warning: the position is wherever the loop kept it (often the folder's own name).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptio.cluster import DistCoordinator
from ckptio.errors import CheckpointFormatError, StateMismatchError
from ckptio.formats import naming, torch_format
from ckptio.formats.hf_index import read_json_file
from ckptio.layouts.detect import Located
from ckptio.storage.manifest import read_manifest
from ckptio.storage.verify import check_against_manifest
from ckptio.training import rng

TOOLS = {"hf-trainer": "transformers.Trainer", "accelerate": "accelerate's save_state"}


@dataclass
class ForeignChecked:
    """What the checks of another tool's folder found: the position, the model to load, the
    loads still to do, and what to say once everything has loaded."""

    position: tuple[int, int, int]
    model_path: Path
    loads: list[Callable[[], None]] = field(default_factory=list)
    rng_missing: Path | None = None
    world_size: int | None = None
    notes: list[str] = field(default_factory=list)


def check_foreign(
    located: Located,
    io: Any,
    model,
    optimizer,
    lr_scheduler,
    sampler,
    strict: bool,
    verify: bool,
    restore_rng: bool,
    stateful: dict[str, Any],
) -> ForeignChecked:
    """Every check of a load of ``located`` (layout ``hf-trainer`` or ``accelerate``) on this rank;
    changes nothing. Returns the loads of optimizer, scheduler, sampler and RNG."""
    folder, layout = located.folder, located.layout
    tool = TOOLS[layout]
    if stateful:
        raise StateMismatchError(
            f"a {tool} folder holds no state for stateful objects ({sorted(stateful)}); load them from where "
            "your loop keeps them",
            path=folder,
        )
    notes: list[str] = []
    if layout == "hf-trainer":
        position = hf_trainer_position(read_json_file(folder / naming.HF_TRAINER_STATE, what="trainer state"),
                                       path=folder / naming.HF_TRAINER_STATE, notes=notes)  # fmt: skip
        optimizer_file, scheduler_file = naming.HF_TRAINER_OPTIMIZER, naming.HF_TRAINER_SCHEDULER
        rng_files = [n for n in located.files if naming.is_hf_rng_file(n)]
    else:
        position = (0, 0, 0)
        notes.append(
            "accelerate's save_state records no epoch, step or sample position (the 'step' in its "
            "random_states files counts gradient-accumulation micro-steps), so (0, 0, 0) is returned: take the "
            "position from where your loop kept it (the folder's name, or an object registered with "
            "accelerator.register_for_checkpointing)"
        )
        optimizer_file, scheduler_file = naming.ACCELERATE_OPTIMIZER, naming.ACCELERATE_SCHEDULER
        rng_files = [n for n in located.files if naming.is_accelerate_rng_file(n)]
    checked = ForeignChecked(position, folder, world_size=len(rng_files) or None, notes=notes)

    if sampler is not None and layout == "hf-trainer" and callable(getattr(sampler, "load_state_dict", None)):
        sampler_state = {"epoch": position[0], "start_index": position[2]}
        try:  # on a shallow copy, as for ckptio's own checkpoints
            copy.copy(sampler).load_state_dict(sampler_state)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateMismatchError(f"the sampler refused the position {sampler_state}: {exc}", path=folder) from exc
        checked.loads.append(lambda: sampler.load_state_dict(sampler_state))
    manifest = read_manifest(folder)
    if manifest is not None:
        check_against_manifest(folder, list(manifest.files), checksums=verify)
    if restore_rng:
        _check_rng(checked, folder, layout, rng_files)
    if lr_scheduler is not None:
        path = _part_file(folder, scheduler_file, tool, "LR scheduler", "lr_scheduler")
        checked.loads.insert(0, io.prepare_lr_scheduler_load(lr_scheduler, str(path)))
    if model is not None:
        io.check_model_load(model, str(folder), strict=strict)
    if optimizer is not None:  # last: it reads the optimizer's state
        path = _part_file(folder, optimizer_file, tool, "optimizer", "optimizer")
        try:
            checked.loads.insert(0, io.prepare_optimizer_load(optimizer, str(path), verify=False))
        except StateMismatchError as exc:
            if layout != "hf-trainer":
                raise
            raise StateMismatchError(
                f"{exc}. {path.name} keeps torch's positional ids, so the optimizer needs Trainer's param groups: "
                "by default two, the parameters with weight decay (Trainer.get_decay_parameter_names: not biases "
                "or norms), then the others, each in named_parameters() order",
                report=exc.report,
            ) from exc
    return checked


def _part_file(folder: Path, name: str, tool: str, what: str, argument: str) -> Path:
    """A part the job asks for must be there: without it the job does not fit the folder (every
    checkpoint of that run lacks it too, e.g. ``save_only_model=True``), which is not damage."""
    path = folder / name
    if not path.is_file():
        raise StateMismatchError(
            f"this {tool} folder holds no {what} state ({name} is missing; saved with save_only_model=True?): "
            f"pass {argument}=None to load the rest",
            path=folder,
        )
    return path


def _check_rng(checked: ForeignChecked, folder: Path, layout: str, rng_files: list[str]) -> None:
    """This rank's RNG file, read and checked (restored with the other loads). Rank ``r`` takes the
    file of process ``r`` (``rng_state.pth`` is process 0's); a rank the saving run did not have
    keeps its generators, as with ckptio's own checkpoints (the world-size warning says so)."""
    coordinator = DistCoordinator()
    rank, world = coordinator.rank, coordinator.world_size
    if layout == "hf-trainer":
        names = [naming.hf_rng_file_name(rank)] + ([naming.hf_rng_file_name(None)] if rank == 0 else [])
        keys = ("python", "numpy", "cpu", "cuda")
    else:
        names = [naming.accelerate_rng_file_name(rank)]
        keys = ("random_state", "numpy_random_seed", "torch_manual_seed", "torch_cuda_manual_seed")
    found = next((folder / n for n in names if n in rng_files), None)
    if found is None:
        if checked.world_size in (None, world):
            checked.rng_missing = folder / names[-1]
        return
    saved = torch_format.load(found, numpy_arrays=True)
    if not isinstance(saved, dict) or not all(k in saved for k in keys[:3]):
        raise CheckpointFormatError(f"not an RNG state file: expected a dict with {list(keys[:3])}", path=found)
    state = rng.from_generator_states(*(saved.get(k) for k in keys), path=str(found))
    checked.loads.append(rng.prepare_rng_restore(state, path=str(found)))


def hf_trainer_position(state: Any, *, path: str | os.PathLike, notes: list[str] | None = None) -> tuple[int, int, int]:
    """``(epoch, step, sample_start_index)`` of a ``trainer_state.json`` (see the module's docstring)."""
    if not isinstance(state, dict):
        raise CheckpointFormatError("trainer state must be a JSON object", path=path)
    global_step, epoch_float, batch_size = state.get("global_step"), state.get("epoch"), state.get("train_batch_size")
    if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
        raise CheckpointFormatError(f"global_step must be a non-negative int, got {global_step!r}", path=path)
    if epoch_float is None:
        epoch_float = 0.0
    if isinstance(epoch_float, bool) or not isinstance(epoch_float, int | float) or not 0 <= epoch_float < 2**53:
        raise CheckpointFormatError(f"epoch must be a non-negative number, got {epoch_float!r}", path=path)
    epoch = math.floor(epoch_float)
    step = global_step
    if epoch > 0:
        per_epoch = max(1, round(global_step / epoch_float))
        step = max(0, global_step - epoch * per_epoch)
        if step >= per_epoch:  # only when the estimate is off (gradient accumulation): the epoch was complete
            epoch, step = epoch + 1, 0
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        if notes is not None:
            notes.append(
                f"trainer_state.json records no train_batch_size (got {batch_size!r}; transformers before 4.35 did "
                f"not write it), so sample_start_index is 0: it is {step} steps times your batch size"
            )
        batch_size = 0
    return epoch, step, step * batch_size
