"""What a path holds: one answer for every reader (loads, the CLI, ``verify``).

:func:`detect` looks at names first (every name and pattern is in
:mod:`ckptio.formats.naming`) and reads at most an index or a file header:

* ``model``: one weights file, a folder with a model index and its shards, or a folder
  holding ``model.safetensors`` / ``pytorch_model.bin``;
* ``optimizer``: ckptio's index (``optimizer.index.json``), ColossalAI's
  (``pytorch_optim.bin.index.json``, or ``optimizer.safetensors.index.json`` over safetensors
  shards), one ``torch.save`` file, or one safetensors file in ColossalAI's flat layout
  (``param_groups`` and ``state.<id>.<name>`` keys; layout ``"safetensors"``);
* ``lr_scheduler``: a scheduler file (a ``torch.save`` file, or the JSON of earlier ckptio versions);
* ``training``: an ``epoch-E_step-S`` folder (``running_states.json`` inside; layout
  ``training``), and, asked for this kind, the training folders of other tools: a
  ``transformers.Trainer`` ``checkpoint-N/`` (``trainer_state.json``; layout ``hf-trainer``) or
  an ``accelerate`` ``save_state`` folder (``random_states_<i>.pkl``; layout ``accelerate``).
  Without a kind those two are what they also are: a model folder;
* ``runs``: a folder of training checkpoints, as ``CheckpointManager`` keeps them.

Asked for a kind (``detect(path, "model")``), it finds that kind inside whatever the path is
(the model of a training checkpoint, the model index of a folder that also holds an
optimizer). A folder left renamed aside by a crash is put back first.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ckptio.errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError
from ckptio.formats import naming, safetensors_format
from ckptio.formats.hf_index import ShardIndex, read_index
from ckptio.storage import atomic

KINDS = ("model", "optimizer", "lr_scheduler", "training", "runs")


@dataclass(frozen=True)
class Located:
    """A checkpoint found at a path: its kind and layout, the folder of its files, the file
    that defines it (an index, a weights file, ``running_states.json``) and every file it has
    (relative to ``folder``; the index of a sharded one lists its shards)."""

    kind: str
    layout: str
    folder: Path
    entry: str | None
    files: tuple[str, ...]
    index: ShardIndex | None = None

    @property
    def entry_path(self) -> Path:
        return self.folder / self.entry if self.entry is not None else self.folder

    @property
    def is_sharded(self) -> bool:
        return self.index is not None

    @property
    def weight_files(self) -> tuple[str, ...]:
        """The files holding tensors: the shards of an index, or the single file."""
        if self.index is not None:
            return tuple(self.index.shard_files)
        return (self.entry,) if self.entry is not None else ()


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not naming.is_temporary(p.name))


def _restore(path: Path) -> None:
    if not path.exists():
        with contextlib.suppress(OSError):
            atomic.recover(path)


def detect(path: str | os.PathLike, kind: str | None = None) -> Located:
    """What ``path`` holds (``kind=None``), or the checkpoint of ``kind`` found at ``path``."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    _restore(path)
    if not path.exists():
        raise CheckpointNotFoundError("checkpoint does not exist", path=path)
    if kind == "model":
        return _model(path)
    if kind == "optimizer":
        return _optimizer(path)
    if kind == "lr_scheduler":
        if not path.is_file():
            raise CheckpointFormatError("expected an LR scheduler file, found a folder", path=path)
        return _file(path, "lr_scheduler", _scheduler_layout(path))
    if kind == "training":
        return _training(path)
    if kind == "runs":
        return _runs(path)
    return _any(path)


def _any(path: Path) -> Located:
    if path.is_dir():
        entries = _entries(path)
        if naming.RUNNING_STATES in entries:
            return _training(path)
        if any(naming.parse_checkpoint_name(n) is not None and (path / n).is_dir() for n in entries):
            return _runs(path)
        if not any(naming.is_model_index(n) for n in entries) and _optimizer_indexes(entries):
            return _optimizer(path)
        return _model(path)
    name = path.name
    if naming.is_optimizer_index(name) or naming.is_colossal_optimizer_index(name):
        return _optimizer(path)
    if name.lower().endswith(".safetensors"):
        return _optimizer(path) if _is_flat_optimizer(path) else _model(path)
    if naming.is_index_file(name):
        return _model(path)
    sniffed = _sniff_file(path)
    if sniffed == "optimizer":
        return _optimizer(path)
    if sniffed == "lr_scheduler":
        return _file(path, "lr_scheduler", _scheduler_layout(path))
    return _model(path)


def _file(path: Path, kind: str, layout: str) -> Located:
    return Located(kind, layout, path.parent, path.name, (path.name,))


# ----------------------------------------------------------------------------- model
def _pick_model_index(folder: Path, names: list[str]) -> str:
    if len(names) > 1:  # both formats of one save (Hugging Face repositories ship both): prefer safetensors
        present = set(names)
        names = [n for n in names if naming.safetensors_twin(n) == n or naming.safetensors_twin(n) not in present]
    if len(names) > 1:
        raise CheckpointFormatError(
            f"folder holds several model indexes ({', '.join(sorted(names))}); pass the path of the index file to load",
            path=folder,
        )
    return names[0]


def _sharded(index_path: Path, kind: str, layout: str) -> Located:
    index = read_index(index_path)
    files = (index_path.name, *index.shard_files)
    return Located(kind, layout, index_path.parent, index_path.name, files, index)


def _model(path: Path) -> Located:
    if path.is_file():
        if naming.is_index_file(path.name):
            return _sharded(path, "model", "sharded")
        return _file(path, "model", "single")
    entries = _entries(path)
    indexes = [n for n in entries if naming.is_model_index(n)]
    if indexes:
        return _sharded(path / _pick_model_index(path, indexes), "model", "sharded")
    for single in (naming.SAFETENSORS_WEIGHTS, naming.BIN_WEIGHTS):
        if single in entries:
            return _file(path / single, "model", "single")
    if naming.RUNNING_STATES in entries and naming.TRAINING_MODEL_DIR in entries:
        return _model(path / naming.TRAINING_MODEL_DIR)  # a training checkpoint: its model part
    raise CheckpointNotFoundError(
        "no model checkpoint in this folder: expected an index JSON "
        f"({naming.SAFETENSORS_INDEX} or {naming.BIN_INDEX}), {naming.SAFETENSORS_WEIGHTS} "
        f"or {naming.BIN_WEIGHTS}",
        path=path,
    )


# ----------------------------------------------------------------------------- optimizer
def _optimizer_indexes(entries: list[str]) -> list[tuple[str, str]]:
    found = [("ckptio", n) for n in entries if naming.is_optimizer_index(n)]
    return found + [("colossalai", n) for n in entries if naming.is_colossal_optimizer_index(n)]


def _optimizer(path: Path) -> Located:
    if path.is_file():
        if naming.is_optimizer_index(path.name):
            return _sharded(path, "optimizer", "ckptio")
        if naming.is_colossal_optimizer_index(path.name):
            return _colossal(path)
        if safetensors_format.is_safetensors_file(path):
            return _file(path, "optimizer", "safetensors")
        return _file(path, "optimizer", "torch")
    entries = _entries(path)
    found = _optimizer_indexes(entries)
    if not found and naming.RUNNING_STATES in entries and naming.TRAINING_OPTIMIZER_DIR in entries:
        return _optimizer(path / naming.TRAINING_OPTIMIZER_DIR)
    if len(found) == 1:
        layout, name = found[0]
        return _sharded(path / name, "optimizer", "ckptio") if layout == "ckptio" else _colossal(path / name)
    if not found:
        raise CheckpointNotFoundError(
            f"no optimizer checkpoint in this folder: expected {naming.OPTIMIZER_INDEX}, "
            f"{naming.COLOSSAL_OPTIM_INDEX} or {naming.COLOSSAL_OPTIM_SAFE_INDEX}",
            path=path,
        )
    raise CheckpointFormatError(
        f"folder holds several optimizer indexes ({', '.join(n for _, n in found)}); pass the index file to load",
        path=path,
    )


def _colossal(index_path: Path) -> Located:
    located = _sharded(index_path, "optimizer", "colossalai")
    groups = located.index.metadata.get("param_groups") if located.index is not None else None
    if isinstance(groups, str):
        return Located(
            located.kind, located.layout, located.folder, located.entry, (*located.files, groups), located.index
        )
    return located


# ----------------------------------------------------------------------------- training
def _training(path: Path) -> Located:
    entries = _entries(path) if path.is_dir() else []
    if naming.RUNNING_STATES in entries:
        layout, entry = "training", naming.RUNNING_STATES
    elif naming.HF_TRAINER_STATE in entries:
        layout, entry = "hf-trainer", naming.HF_TRAINER_STATE
    elif any(naming.is_accelerate_rng_file(n) for n in entries):
        layout, entry = "accelerate", None
    else:
        raise CheckpointNotFoundError(
            f"{naming.RUNNING_STATES} is missing: not a complete training checkpoint (pass the epoch-E_step-S "
            f"folder; a transformers.Trainer checkpoint-N folder has {naming.HF_TRAINER_STATE}, an accelerate "
            f"save_state folder {naming.accelerate_rng_file_name(0)})",
            path=path,
        )
    files = tuple(sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()))
    return Located("training", layout, path, entry, files)


def training_checkpoints_in(path: str | os.PathLike) -> list[Path]:
    """The ``epoch-E_step-S`` folders directly inside ``path`` (a run's folder), by epoch then step."""
    folder = Path(path)
    if not folder.is_dir() or (folder / naming.RUNNING_STATES).is_file():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and naming.parse_checkpoint_name(p.name) is not None]
    return sorted(found, key=lambda p: naming.parse_checkpoint_name(p.name))


def _runs(path: Path) -> Located:
    found = training_checkpoints_in(path)
    if not found:
        raise CheckpointNotFoundError("no training checkpoints (epoch-E_step-S folders) in this folder", path=path)
    return Located("runs", "runs", path, None, tuple(p.name for p in found))


# ----------------------------------------------------------------------------- single files
def _scheduler_layout(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(64).lstrip()
    return "json" if head.startswith(b"{") else "torch"


def _is_flat_optimizer(path: Path) -> bool:
    """A safetensors file in ColossalAI's flat optimizer layout (header only): it has ``param_groups``."""
    try:
        with safetensors_format.SafetensorsReader.open(path) as reader:
            keys = reader.tensors
            return "param_groups" in keys and all(k == "param_groups" or k.startswith("state.") for k in keys)
    except (CheckpointError, OSError):
        return False  # the model reader then reports what is wrong with the file


def _sniff_file(path: Path) -> str:
    """For the CLI only: which kind a lone ``torch.save`` / JSON file is, from its top-level keys."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
    except OSError:
        return "model"
    if head.startswith(b"{"):
        with contextlib.suppress(OSError, ValueError):
            with open(path, "rb") as fh:
                body = json.loads(fh.read(1024 * 1024))
            if isinstance(body, dict) and body.get("format") == "ckptio-lr-scheduler":
                return "lr_scheduler"
        return "model"
    from ckptio.formats import torch_format

    try:
        obj = torch_format.load(path, mmap=True)
    except Exception:  # noqa: BLE001 (the model reader then reports what is wrong with the file)
        return "model"
    if isinstance(obj, dict) and "state" in obj and "param_groups" in obj:
        return "optimizer"
    no_tensors = isinstance(obj, dict) and obj and not any(hasattr(v, "shape") for v in obj.values())
    if no_tensors and {"last_epoch", "_last_lr"} & set(obj):  # every torch scheduler has one of them
        return "lr_scheduler"
    return "model"
