"""Objects with ``state_dict()`` / ``load_state_dict()`` in a training checkpoint.

``save_checkpoint(..., stateful={"scaler": scaler, "ema": ema})`` saves each object's
``state_dict()`` (:mod:`ckptio.state.stateful`) as two files of the checkpoint::

    stateful/ema.json          {"format": "ckptio-stateful", "format_version": 1, "state": <tagged JSON>}
    stateful/ema.safetensors   its tensors with a dimension, keyed by their position in the state

Like the model and the optimizer, the state is the job's, not a rank's: the JSON is the
master's, tensors are written once through the engine (a DTensor, e.g. an EMA of FSDP2
weights, gathered into full tensors by the ranks that hold it). Loading reads and checks
every object's files against its live ``state_dict()`` (its keys; each tensor's shape) before
anything loads, and lays a tensor out like the live one it replaces (a DTensor sharded like it,
a plain tensor on its device).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ckptio.engine.group import Group
from ckptio.engine.optimizer import place_like
from ckptio.engine.save import FilesPart, Part, TensorPart
from ckptio.engine.tensors import is_dtensor
from ckptio.engine.write import WriteSpec
from ckptio.errors import CheckpointCorruptError, StateMismatchError
from ckptio.formats import naming, safetensors_format
from ckptio.formats.hf_index import read_json_file
from ckptio.state import stateful as sflat
from ckptio.state.optimizer import TensorRef

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_stateful(stateful: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``stateful`` argument, checked: names become file names, objects need both methods."""
    if stateful is None:
        return {}
    if not isinstance(stateful, Mapping):
        raise TypeError(f"stateful must be a dict of name -> object, got {type(stateful).__name__}")
    for name, obj in stateful.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"stateful names become file names: letters, digits, '_' or '-', got {name!r}")
        if not callable(getattr(obj, "state_dict", None)) or not callable(getattr(obj, "load_state_dict", None)):
            raise TypeError(f"stateful[{name!r}] ({type(obj).__name__}) needs state_dict() and load_state_dict()")
    return dict(stateful)


def stateful_parts(stateful: Mapping[str, Any], group: Group) -> list[Part]:
    """The parts of a save: per object, its tensors through the engine on ``group`` and its JSON
    (the master's). The state is taken now: a value that cannot be saved raises here."""
    parts: list[Part] = []
    for name, obj in stateful.items():
        json_name, tensors_name = naming.stateful_file_names(name)
        tensors, document = sflat.flatten(obj.state_dict(), what=f"stateful[{name!r}]")
        spec = WriteSpec(tensors_name, 1, shard=False, use_safetensors=True)
        parts.append(TensorPart(tensors, spec, group, slot=f"stateful/{name}", master_only=group.solo))
        body = (json.dumps(document, indent=1) + "\n").encode("utf-8")
        parts.append(FilesPart({json_name: body}, master_only=True))
    return parts


def prepare_stateful_load(load_dir: Path, name: str, obj: Any) -> Callable[[], None]:
    """Read and check ``name``'s saved state against ``obj`` (changing nothing); returns the call
    that loads it. A checkpoint without it, or with the state of another kind of object, raises
    :class:`StateMismatchError` (the job asks for what the checkpoint does not hold)."""
    json_name, tensors_name = naming.stateful_file_names(name)
    json_path = load_dir / json_name
    if not json_path.is_file():
        folder = load_dir / naming.STATEFUL_DIR
        saved = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        raise StateMismatchError(
            f"holds no state for stateful[{name!r}] (it holds {saved or 'none'}); was it saved with stateful=?",
            path=load_dir,
        )
    state = sflat.parse(read_json_file(json_path, what="stateful object file"), path=str(json_path))
    live_state = obj.state_dict()
    missing = [k for k in live_state if k not in state]
    if missing:
        raise StateMismatchError(
            f"the saved state lacks {missing[:5]} of {type(obj).__name__}.state_dict(): the state of another object?",
            path=json_path,
        )
    if any(True for _ in sflat.refs(state)):
        state = _read_tensors(load_dir / tensors_name, state, live_state)

    def load() -> None:
        try:
            obj.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            raise StateMismatchError(
                f"{type(obj).__name__}.load_state_dict refused the saved state of stateful[{name!r}]: {exc}",
                path=json_path,
            ) from exc

    return load


def _read_tensors(path: Path, state: dict[str, Any], live_state: Any) -> dict[str, Any]:
    with safetensors_format.SafetensorsReader.open(path) as reader:

        def read(position: tuple, ref: TensorRef) -> torch.Tensor:
            info = reader.tensors.get(ref.key)
            if info is None or info.dtype != ref.dtype or info.shape != ref.shape:
                raise CheckpointCorruptError(
                    f"tensor {ref.key!r} is missing or differs from its reference ({ref.dtype}{list(ref.shape)})",
                    path=path,
                )
            live = sflat.at(live_state, position)
            if isinstance(live, torch.Tensor) and tuple(live.shape) != ref.shape:
                raise StateMismatchError(
                    f"{ref.key!r} has shape {list(ref.shape)} in the checkpoint, {list(live.shape)} in the live "
                    "object's state",
                    path=path,
                )
            tensor = reader.read(ref.key)
            if not isinstance(live, torch.Tensor):
                return tensor
            return place_like(tensor, live) if is_dtensor(live) else tensor.to(live.device)

        return sflat.resolve(state, read)
