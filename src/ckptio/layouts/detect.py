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
* a folder written by ``torch.distributed.checkpoint.save`` (``.metadata`` + ``*.distcp``, e.g. a
  torchtitan ``step-N`` folder), layout ``"dcp"``: ``model`` when it holds model tensors, else
  ``optimizer`` (:mod:`ckptio.layouts.dcp` says which entries are which);
* ``runs``: a folder of training checkpoints, as ``CheckpointManager`` keeps them.

Asked for a kind (``detect(path, "model")``), it finds that kind inside whatever the path is
(the model of a training checkpoint, the model index of a folder that also holds an
optimizer). A folder left renamed aside by a crash is put back first. Given a file or folder
of another kind that it recognises (:func:`identify`: from the first bytes, then the JSON keys
or the ``torch.save`` content), it says what it is instead ("this is an LR scheduler file
(ckptio JSON), not an optimizer checkpoint"), rather than letting a parser fail on bytes
that were never its format.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from ckptio.errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError
from ckptio.formats import dcp, naming, safetensors_format, sniff
from ckptio.formats.hf_index import ShardIndex, read_index, read_json_file
from ckptio.layouts import dcp as dcp_layout
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
    if path.name == naming.DCP_METADATA and path.is_file():
        path = path.parent  # a DCP checkpoint is its folder
    if kind == "model":
        return _model(path)
    if kind == "optimizer":
        return _optimizer(path)
    if kind == "lr_scheduler":
        if not path.is_file():
            raise CheckpointFormatError("expected an LR scheduler file, found a folder", path=path)
        return _scheduler_file(path)
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
        if naming.DCP_METADATA in entries:
            return _dcp(path)
        if not any(naming.is_model_index(n) for n in entries) and _optimizer_indexes(entries):
            return _optimizer(path)
        if _holds_a_model(entries):
            return _model(path)
        raise CheckpointNotFoundError(
            "no checkpoint here: expected a model (an index JSON, "
            f"{naming.SAFETENSORS_WEIGHTS} or {naming.BIN_WEIGHTS}), an optimizer ({naming.OPTIMIZER_INDEX} or "
            f"{naming.COLOSSAL_OPTIM_INDEX}), a training checkpoint ({naming.RUNNING_STATES}) or a folder of "
            "training checkpoints (epoch-E_step-S)",
            path=path,
        )
    name = path.name
    if naming.is_optimizer_index(name) or naming.is_colossal_optimizer_index(name):
        return _optimizer(path)
    if name.lower().endswith(".safetensors"):
        return _optimizer(path) if _is_flat_optimizer(path) else _model(path)
    if naming.is_index_file(name):
        return _model(path)
    found, _ = identify(path)
    if found == "optimizer":
        return _optimizer(path)
    if found == "lr_scheduler":
        return _scheduler_file(path)
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
        if sniff.file_format(path) in (sniff.JSON, sniff.TEXT):
            found, _ = identify(path)
            if found == "model":  # a model index under another name
                return _sharded(path, "model", "sharded")
            raise wrong_kind(path, "model")
        return _file(path, "model", "single")
    entries = _entries(path)
    if naming.DCP_METADATA in entries:
        return _dcp(path, "model")
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
        f"({naming.SAFETENSORS_INDEX} or {naming.BIN_INDEX}), {naming.SAFETENSORS_WEIGHTS}, "
        f"{naming.BIN_WEIGHTS} or a DCP {naming.DCP_METADATA}"
        + _step_folders_hint(path, entries)
        + _holds_instead(entries, "model"),
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
        form = sniff.file_format(path)
        if form == sniff.SAFETENSORS and _is_flat_optimizer(path):
            return _file(path, "optimizer", "safetensors")
        if form in (sniff.JSON, sniff.TEXT, sniff.SAFETENSORS):
            found, what = identify(path)
            if found == "optimizer":  # an optimizer index under another name
                return _colossal(path) if "ColossalAI" in what else _sharded(path, "optimizer", "ckptio")
            raise wrong_kind(path, "optimizer")
        return _file(path, "optimizer", "torch")
    entries = _entries(path)
    if naming.DCP_METADATA in entries:
        return _dcp(path, "optimizer")
    found = _optimizer_indexes(entries)
    if not found and naming.RUNNING_STATES in entries and naming.TRAINING_OPTIMIZER_DIR in entries:
        return _optimizer(path / naming.TRAINING_OPTIMIZER_DIR)
    if len(found) == 1:
        layout, name = found[0]
        return _sharded(path / name, "optimizer", "ckptio") if layout == "ckptio" else _colossal(path / name)
    if not found:
        raise CheckpointNotFoundError(
            f"no optimizer checkpoint in this folder: expected {naming.OPTIMIZER_INDEX}, "
            f"{naming.COLOSSAL_OPTIM_INDEX}, {naming.COLOSSAL_OPTIM_SAFE_INDEX} or a DCP {naming.DCP_METADATA}"
            + _step_folders_hint(path, entries)
            + _holds_instead(entries, "optimizer"),
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


# ----------------------------------------------------------------------------- torch.distributed.checkpoint
def _dcp(folder: Path, kind: str | None = None) -> Located:
    meta = dcp.read_metadata(folder / naming.DCP_METADATA)
    found = dcp_layout.kind_of(meta)
    wanted = kind or found
    if wanted is None or (wanted == "model" and found != "model"):
        raise CheckpointNotFoundError(
            f"DCP checkpoint holds no model tensors{' and no optimizer' if found is None else ''} "
            f"(keys: {', '.join(list(meta.tensors)[:5]) or 'none'}...); see ckptio.layouts.dcp for what is read",
            path=folder,
        )
    if wanted == "optimizer" and dcp_layout.optimizer_part(meta) is None:
        raise CheckpointNotFoundError("DCP checkpoint holds no optimizer state (no param_groups)", path=folder)
    return Located(wanted, "dcp", folder, naming.DCP_METADATA, (naming.DCP_METADATA, *meta.files))


def _step_folders_hint(path: Path, entries: list[str]) -> str:
    """torchtitan keeps each checkpoint in ``step-N/``: name the newest to pass instead of their parent."""
    steps = [n for n in entries if naming.parse_torchtitan_step(n) is not None and (path / n).is_dir()]
    steps = [n for n in steps if (path / n / naming.DCP_METADATA).is_file()]
    if not steps:
        return ""
    steps.sort(key=naming.parse_torchtitan_step)
    return f"; it holds torchtitan checkpoints ({', '.join(steps)}): pass one of them, e.g. {path / steps[-1]}"


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


# ----------------------------------------------------------------------------- what a file is
_WANTED = {
    "model": ("model weights", "booster.load_model"),
    "optimizer": ("an optimizer checkpoint", "booster.load_optimizer"),
    "lr_scheduler": ("an LR scheduler file", "booster.load_lr_scheduler"),
    "training": ("a training checkpoint", "ckptio.training.load_checkpoint"),
}


def _is_flat_optimizer(path: Path) -> bool:
    """A safetensors file in ColossalAI's flat optimizer layout (header only): it has ``param_groups``."""
    try:
        with safetensors_format.SafetensorsReader.open(path) as reader:
            keys = reader.tensors
            return "param_groups" in keys and all(k == "param_groups" or k.startswith("state.") for k in keys)
    except (CheckpointError, OSError):
        return False  # the model reader then reports what is wrong with the file


def wrong_kind(
    path: str | os.PathLike, wanted: str, found: tuple[str | None, str] | None = None
) -> CheckpointFormatError:
    """The error for a file given where a checkpoint of kind ``wanted`` was expected: what the
    file is (``found``: ``(kind, what)``, else :func:`identify`), and which call loads it."""
    found, described = identify(path) if found is None else found
    expected, _ = _WANTED[wanted]
    message = f"this is {described}, not {expected}"
    if found in _WANTED and found != wanted:
        message += f" (load it with {_WANTED[found][1]})"
    return CheckpointFormatError(message, path=path)


def identify(path: str | os.PathLike) -> tuple[str | None, str]:
    """``(kind, what)`` of one file: the kind of checkpoint it is (one of :data:`KINDS`, or
    None) and a phrase naming it ("an LR scheduler file (ckptio JSON)", "a text file").

    Reads the head of the file; a JSON file whole (up to the index limit); a ``torch.save``
    file memory-mapped with ``weights_only=True``. Never raises for a readable file.
    """
    path = Path(path)
    try:
        form = sniff.file_format(path)
    except OSError as exc:
        return None, f"an unreadable file ({exc.strerror or exc})"
    if form == sniff.SAFETENSORS:
        if _is_flat_optimizer(path):
            return "optimizer", "an optimizer file in ColossalAI's flat safetensors layout"
        return "model", "a safetensors weights file"
    if form == sniff.JSON:
        return _identify_json(path)
    if form == sniff.TORCH:
        return _identify_torch(path)
    return None, {sniff.TEXT: "a text file", sniff.EMPTY: "an empty file"}.get(form, "a file of unknown format")


def _identify_json(path: Path) -> tuple[str | None, str]:
    try:
        body = read_json_file(path, what="JSON file")
    except CheckpointError:
        return None, "a JSON file that does not parse"
    if not isinstance(body, dict):
        return None, "a JSON file"
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    fmt = body.get("format")
    if fmt == "ckptio-lr-scheduler":
        return "lr_scheduler", "an LR scheduler file (ckptio JSON)"
    if isinstance(body.get("weight_map"), dict):
        if "optimizer" in body or metadata.get("format") == "ckptio-optimizer":
            return "optimizer", "ckptio's optimizer index (JSON)"
        if "param_groups" in metadata:
            return "optimizer", "ColossalAI's optimizer index (JSON)"
        return "model", "a model index (JSON)"
    if fmt == "ckptio-manifest":
        return None, f"a checkpoint's manifest ({naming.MANIFEST})"
    if fmt == "ckptio-commit":
        return None, f"a commit marker ({naming.COMMIT_MARKER})"
    if fmt == "ckptio-rng":
        return None, "a rank's RNG state (ckptio JSON)"
    if {"epoch", "step", "sample_start_index"} <= body.keys():
        return None, f"the {naming.RUNNING_STATES} of a training checkpoint"
    if "model_type" in body or "architectures" in body:
        return None, f"a Hugging Face model config ({naming.HF_CONFIG})"
    return None, "a JSON file"


def _identify_torch(path: Path) -> tuple[str | None, str]:
    from ckptio.formats import torch_format

    try:
        obj = torch_format.load(path, mmap=True)
    except CheckpointError as exc:
        if "weights_only" in str(exc):
            return None, "a torch.save file that runs code when loaded"
        return None, "a torch.save file that does not load"
    kind, what = torch_kind(obj)
    return kind, what or "a torch.save file"


def torch_kind(obj) -> tuple[str | None, str | None]:
    """``(kind, what)`` of a loaded ``torch.save`` object, ``(None, None)`` when not recognised."""
    from ckptio.formats import torch_format

    what = torch_format.describe(obj)
    if what is None:
        return None, None
    return ("optimizer" if "optimizer" in what else "lr_scheduler" if "scheduler" in what else "model"), what


def _holds_a_model(entries: list[str]) -> bool:
    return (
        any(naming.is_model_index(n) for n in entries)
        or naming.SAFETENSORS_WEIGHTS in entries
        or naming.BIN_WEIGHTS in entries
    )


def _holds_instead(entries: list[str], wanted: str) -> str:
    """``"; it holds ..."`` for a folder that holds a checkpoint of another kind, else ``""``."""
    if wanted != "optimizer" and _optimizer_indexes(entries):
        return "; it holds an optimizer checkpoint (load it with booster.load_optimizer)"
    if wanted != "model" and _holds_a_model(entries):
        return "; it holds a model checkpoint (load it with booster.load_model)"
    if any(naming.parse_checkpoint_name(n) is not None for n in entries):
        return "; it holds training checkpoints (epoch-E_step-S folders): pass one of them"
    return ""


def _scheduler_file(path: Path) -> Located:
    form = sniff.file_format(path)
    if form == sniff.TORCH:
        return _file(path, "lr_scheduler", "torch")
    found, _ = identify(path)
    if found != "lr_scheduler":
        raise wrong_kind(path, "lr_scheduler")
    return _file(path, "lr_scheduler", "json")
