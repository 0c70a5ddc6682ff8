"""Any object's ``state_dict()`` <-> (tensors by key, tagged JSON), and back: pure functions.

Training checkpoints carry objects that have ``state_dict()`` / ``load_state_dict()`` (a
``GradScaler``, an EMA of the weights, a data loader's position). Their state is split like an
optimizer's (:mod:`ckptio.state.optimizer`): every tensor with a dimension goes to a safetensors
file under a key made of its position (``shadow/fc1.weight``, ``history/3``: dict keys with
``%`` and ``/`` escaped, list and tuple indices in decimal), and the rest is
:mod:`ckptio.formats.tagged_json` where each such tensor is a reference
``{"__ref__": {"key", "dtype", "shape"}}``; 0-dim tensors that JSON holds exactly stay inline.
No pickle. Keys are never parsed back: each reference carries its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ckptio.errors import CheckpointFormatError
from ckptio.formats import tagged_json
from ckptio.formats.versioned import check_versioned
from ckptio.state.optimizer import TensorRef

FORMAT = "ckptio-stateful"
FORMAT_VERSION = 1


def _segment(position: int | str) -> str:
    return str(position) if isinstance(position, int) else position.replace("%", "%25").replace("/", "%2F")


def tensor_key(position: tuple[int | str, ...]) -> str:
    """The file key of the tensor at ``position`` in the state (unique: one container per level)."""
    return "/".join(_segment(p) for p in position)


def flatten(state: Any, *, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors by key, JSON document)`` of one object's ``state_dict()`` (``what`` names it in errors).

    Tensors are kept as they are (a DTensor stays one): the engine writes them.
    """
    if not isinstance(state, Mapping):
        raise CheckpointFormatError(f"{what}.state_dict() returned a {type(state).__name__}, not a dict")
    tensors: dict[str, torch.Tensor] = {}

    def to_file(tensor: torch.Tensor, position: tuple, where: str) -> Any:
        if tensor.dim() == 0 and tagged_json.has_exact_form(tensor):
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()  # a 0-dim DTensor: tiny, every rank has it
            return {tagged_json.TENSOR_TAG: tagged_json.encode_tensor(tensor.detach().cpu(), where)}
        key = tensor_key(position)
        tensors[key] = tensor.detach()
        return TensorRef(key, tensor.dtype, tuple(tensor.shape)).to_json()

    try:
        body = tagged_json.encode(dict(state), what, to_file)
    except tagged_json.NotJSONable as exc:
        raise CheckpointFormatError(
            f"{exc}: a saved state keeps tensors, numbers, strings, lists, tuples and dicts with string keys; "
            "nothing was saved"
        ) from exc
    return tensors, {"format": FORMAT, "format_version": FORMAT_VERSION, "state": body}


def parse(document: Any, *, path: str) -> dict[str, Any]:
    """The state of a JSON document written by :func:`flatten`, tensors still :class:`TensorRef`."""
    check_versioned(document, format=FORMAT, max_version=FORMAT_VERSION, what="stateful-object file", path=path)
    try:
        state = tagged_json.decode(document.get("state"), lambda body: TensorRef.from_json(body, path=path))
    except ValueError as exc:
        if isinstance(exc, CheckpointFormatError):
            raise
        raise CheckpointFormatError(f"malformed state: {exc}", path=path) from exc
    if not isinstance(state, dict):
        raise CheckpointFormatError("'state' must be an object", path=path)
    return state


def refs(state: Any, position: tuple = ()) -> Iterator[tuple[tuple, TensorRef]]:
    """``(position, ref)`` of every tensor reference in a parsed state."""
    if isinstance(state, TensorRef):
        yield position, state
    elif isinstance(state, list | tuple):
        for i, v in enumerate(state):
            yield from refs(v, (*position, i))
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from refs(v, (*position, k))


def at(value: Any, position: tuple) -> Any:
    """What sits at ``position`` in ``value`` (a live ``state_dict()``), or None."""
    for p in position:
        in_dict = isinstance(value, Mapping) and p in value
        in_list = isinstance(value, list | tuple) and isinstance(p, int) and 0 <= p < len(value)
        if not (in_dict or in_list):
            return None
        value = value[p]
    return value


def resolve(state: Any, read: Callable[[tuple, TensorRef], torch.Tensor], position: tuple = ()) -> Any:
    """``state`` with every reference replaced by ``read(position, ref)``."""
    if isinstance(state, TensorRef):
        return read(position, state)
    if isinstance(state, list):
        return [resolve(v, read, (*position, i)) for i, v in enumerate(state)]
    if isinstance(state, tuple):
        return tuple(resolve(v, read, (*position, i)) for i, v in enumerate(state))
    if isinstance(state, dict):
        return {k: resolve(v, read, (*position, k)) for k, v in state.items()}
    return state
