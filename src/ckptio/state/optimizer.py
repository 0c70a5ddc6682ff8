"""Optimizer state <-> (flat ``{key: full tensor}``, JSON description), and back by name.

Pure functions, no file I/O, so the single-process files, ColossalAI's layout and the
multi-rank writers share them:

* :func:`flatten_optimizer_state` turns ``optimizer.state_dict()`` into tensors keyed
  ``"<param_name>/<state_name>"`` (full shape; a DTensor stays a DTensor, its ``shape`` is
  the full one) plus JSON: groups with their hyper-parameters and the *names* of their
  parameters, full parameter shapes, and scalar state (``step`` with its dtype) inline.
  State may nest tensors in lists, tuples and dicts (LBFGS's ``old_dirs``): each one is a
  tensor of its own, keyed by its position (``"<param>/old_dirs/3"``, see :func:`state_key`),
  and referenced from the JSON where it sat. No tensor data goes into JSON but 0-dim scalars.
* :func:`saved_from_description` / :func:`saved_from_state_dict` read either back into one
  :class:`SavedOptimizer`, whose tensor values may be :class:`TensorRef` (not read yet).
* :func:`match_saved_to_live` checks a saved optimizer against the live one (groups,
  names, shapes) and returns a ``state_dict`` skeleton for ``optimizer.load_state_dict``,
  whose refs :func:`materialize` resolves through a reader callback ``read(ref, param)``
  ("give me the tensor for key K"), so a multi-rank loader can return just its slice.
  Files that record no parameter shapes (a torch file, ColossalAI's layout) are checked
  against the shapes torch's own optimizers give their state (:data:`STATE_SHAPES`).

Where the names come from: an optimizer alone has none, so :func:`register_model` links an
optimizer to its model (``Booster.boost`` and ``save_checkpoint`` do it; a weak reference,
so nothing is kept alive). Names are the model's clean ``named_parameters()`` names. Without
a model, or when the optimizer holds a parameter the model lacks, parameters are named by
their positional id (``"0"``, ``"1"``, ...) and loading falls back to matching by position.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ckptio.errors import CheckpointFormatError, StateMismatchError
from ckptio.formats import dtypes, tagged_json
from ckptio.formats.versioned import check_versioned
from ckptio.state.model import clean_key, unwrap_model

FORMAT = "ckptio-optimizer"
# 2: tensors nested inside a state entry are references too. A file without any is written as
# version 1, which older readers load; they refuse version 2 instead of misreading it.
FORMAT_VERSION = 2
KEY_SEPARATOR = "/"

_MODELS: weakref.WeakKeyDictionary[Any, weakref.ref] = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------- names
def register_model(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Remember which model ``optimizer`` trains, so its state is saved by parameter name."""
    _MODELS[optimizer] = weakref.ref(model)


def registered_model(optimizer: torch.optim.Optimizer) -> nn.Module | None:
    ref = _MODELS.get(optimizer)
    return None if ref is None else ref()


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """The parameters of each group, in the order ``state_dict()`` numbers them."""
    return [list(group["params"]) for group in optimizer.param_groups]


def param_names(optimizer: torch.optim.Optimizer, model: nn.Module | None = None) -> list[str] | None:
    """The name of every parameter in positional-id order, or ``None`` when they are unknown."""
    model = model if model is not None else registered_model(optimizer)
    if model is None:
        return None
    by_id: dict[int, str] = {}
    for name, param in unwrap_model(model).named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), clean_key(name))
    names = [by_id.get(id(p)) for group in optimizer_params(optimizer) for p in group]
    if any(n is None for n in names) or len(set(names)) != len(names):
        return None
    return names  # type: ignore[return-value]


def state_key(param: str, state_name: str, *position: int | str) -> str:
    """The file key of a state tensor: ``<param>/<state>[/<index or key>...]``.

    The state name and every dict key inside it are escaped (``%`` -> ``%25``, ``/`` ->
    ``%2F``) so that a key stays unique whatever the names hold; list and tuple indices are
    decimal. Keys are never parsed back: the JSON holds each reference's key.
    """
    parts = [_escape(state_name), *(str(p) if isinstance(p, int) else _escape(p) for p in position)]
    return KEY_SEPARATOR.join([param, *parts])


def _escape(segment: str) -> str:
    return segment.replace("%", "%25").replace(KEY_SEPARATOR, "%2F")


def map_tensors(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``value`` with every tensor or :class:`TensorRef` inside lists, tuples and dicts replaced
    by ``fn(leaf)``; containers are rebuilt, other leaves kept."""
    if isinstance(value, torch.Tensor | TensorRef):
        return fn(value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def iter_tensors(value: Any, position: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """``(position, leaf)`` for every tensor or :class:`TensorRef` inside ``value``, in order."""
    if isinstance(value, torch.Tensor | TensorRef):
        yield position, value
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from iter_tensors(v, (*position, i))
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from iter_tensors(v, (*position, k))


def describe_entry(state_name: str, position: tuple) -> str:
    """``'old_dirs'[2]`` for messages."""
    return repr(state_name) + "".join(f"[{p!r}]" for p in position)


# ------------------------------------------------------------------------------- saving
def flatten_optimizer_state(
    state_dict: dict[str, Any],
    names: list[str] | None,
    shapes: list[tuple[int, ...]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into full tensors by key and a JSON description.

    ``names[i]`` names positional id ``i`` (``None``: the ids themselves, as strings);
    ``shapes[i]`` is that parameter's full shape, recorded so a load can check it before
    reading. Scalar (0-dim) tensors such as ``step`` stay in the JSON with their dtype (unless
    JSON cannot hold them exactly: complex, float8); every other tensor, at any depth, is in
    the returned dict.
    """
    groups = state_dict.get("param_groups")
    state = state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise CheckpointFormatError("not an optimizer state_dict: expected 'state' and 'param_groups'")
    ids = [pid for group in groups for pid in group["params"]]
    key_of = {pid: (names[i] if names is not None else str(pid)) for i, pid in enumerate(ids)}
    flat: dict[str, torch.Tensor] = {}
    desc_groups = []
    for g, group in enumerate(groups):
        hparams = {k: v for k, v in group.items() if k != "params"}
        body = _encode_or_raise(hparams, f"param_groups[{g}]")
        body["params"] = [key_of[pid] for pid in group["params"]]
        desc_groups.append(body)
    desc_state: dict[str, dict[str, Any]] = {}
    nested = False
    for pid, entries in state.items():
        if pid not in key_of:
            raise CheckpointFormatError(f"optimizer state has an entry for id {pid!r} that no param group lists")
        pname = key_of[pid]
        out: dict[str, Any] = {}
        for sname, value in entries.items():
            if not isinstance(sname, str):
                raise CheckpointFormatError(
                    f"state name {sname!r} of {pname!r} is not a string; the ckptio layout keys state by name. "
                    "Save with shard=False (a torch file) instead."
                )
            out[sname], deep = _entry_to_json(value, pname, sname, flat)
            nested = nested or deep
        desc_state[pname] = out
    description: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if nested else 1,
        "named": names is not None,
        "param_groups": desc_groups,
        "state": desc_state,
    }
    if shapes is not None:
        description["param_shapes"] = {key_of[pid]: list(shapes[i]) for i, pid in enumerate(ids)}
    return flat, description


def _entry_to_json(value: Any, pname: str, sname: str, flat: dict[str, torch.Tensor]) -> tuple[Any, bool]:
    """The JSON of one state entry; its tensors go into ``flat``. Also says whether any was nested."""
    nested = False

    def to_file(tensor: torch.Tensor, position: tuple, where: str) -> Any:
        nonlocal nested
        if tensor.dim() == 0 and tagged_json.has_exact_form(tensor):
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()  # a 0-dim DTensor: tiny, every rank has it
            return {tagged_json.TENSOR_TAG: tagged_json.encode_tensor(tensor, where)}
        key = state_key(pname, sname, *position)
        if key in flat:
            raise CheckpointFormatError(f"two state tensors would share the file key {key!r}; rename the parameter")
        flat[key] = tensor
        nested = nested or bool(position)
        return TensorRef(key, tensor.dtype, tuple(tensor.shape)).to_json()

    return _encode_or_raise(value, f"state of {pname!r}: {sname}", to_file), nested


def _encode_or_raise(value: Any, where: str, on_tensor: tagged_json.TensorHook | None = None) -> Any:
    try:
        return tagged_json.encode(value, where, on_tensor)
    except tagged_json.NotJSONable as exc:
        raise CheckpointFormatError(
            f"optimizer {exc}; the ckptio format keeps only tensors, numbers, strings, lists, tuples "
            "and dicts. Save with shard=False (a torch file) for other values."
        ) from exc


# ------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class TensorRef:
    """A state tensor not read yet: its key in the files, dtype and full shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        body = {"key": self.key, "dtype": dtypes.to_name(self.dtype), "shape": list(self.shape)}
        return {tagged_json.REF_TAG: body}

    @classmethod
    def from_json(cls, body: Any, *, path: str | None) -> TensorRef:
        ok = isinstance(body, dict) and isinstance(body.get("key"), str) and isinstance(body.get("shape"), list)
        if not ok or not all(type(d) is int and d >= 0 for d in body["shape"]):
            raise CheckpointFormatError(f"malformed tensor reference {body!r}", path=path)
        return cls(body["key"], dtypes.from_name(body.get("dtype"), path=path), tuple(body["shape"]))


@dataclass
class SavedOptimizer:
    """A saved optimizer, whatever the file layout: groups list parameter keys (names, or
    positional ids as strings when ``named`` is False); state values are tensors,
    :class:`TensorRef`, or plain values."""

    groups: list[dict[str, Any]]
    state: dict[str, dict[str, Any]]
    named: bool
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    path: str | None = None


def saved_from_description(desc: Any, *, path: str | None = None) -> SavedOptimizer:
    """Parse the JSON written by :func:`flatten_optimizer_state` (validated, nothing trusted)."""
    check_versioned(desc, format=FORMAT, max_version=FORMAT_VERSION, what="optimizer description", path=path)
    groups, state = desc.get("param_groups"), desc.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise CheckpointFormatError("optimizer description needs 'param_groups' (list) and 'state' (object)", path=path)
    try:
        parsed_groups = []
        for group in groups:
            if not isinstance(group, dict) or not isinstance(group.get("params"), list):
                raise CheckpointFormatError("every param group needs a 'params' list", path=path)
            body = tagged_json.decode({k: v for k, v in group.items() if k != "params"})
            body["params"] = [str(p) for p in group["params"]]
            parsed_groups.append(body)
        parsed_state: dict[str, dict[str, Any]] = {}
        for pname, entries in state.items():
            if not isinstance(entries, dict):
                raise CheckpointFormatError(f"state of {pname!r} must be an object", path=path)
            parsed_state[pname] = {
                s: tagged_json.decode(v, lambda body: TensorRef.from_json(body, path=path)) for s, v in entries.items()
            }
    except ValueError as exc:
        if isinstance(exc, CheckpointFormatError):
            raise
        raise CheckpointFormatError(f"malformed optimizer description: {exc}", path=path) from exc
    shapes = desc.get("param_shapes") or {}
    if not isinstance(shapes, dict):
        raise CheckpointFormatError("'param_shapes' must be an object", path=path)
    return SavedOptimizer(
        parsed_groups,
        parsed_state,
        bool(desc.get("named")),
        {k: tuple(v) for k, v in shapes.items() if isinstance(v, list)},
        path,
    )


def saved_from_state_dict(
    state_dict: Any, *, path: str | None = None, groups: list[dict[str, Any]] | None = None
) -> SavedOptimizer:
    """A plain ``optimizer.state_dict()`` (or ColossalAI's shards + group file) keyed by
    positional ids. ``groups`` replaces ``state_dict['param_groups']`` when given."""
    if not isinstance(state_dict, dict):
        raise CheckpointFormatError("optimizer file must hold a dict", path=path)
    groups = groups if groups is not None else state_dict.get("param_groups")
    state = state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise CheckpointFormatError("optimizer file needs 'state' and 'param_groups'", path=path)
    parsed = []
    for group in groups:
        if not isinstance(group, dict) or not isinstance(group.get("params"), list | tuple):
            raise CheckpointFormatError("every param group needs a 'params' list", path=path)
        body = dict(group)
        body["params"] = [str(p) for p in group["params"]]
        parsed.append(body)
    return SavedOptimizer(parsed, {str(k): dict(v) for k, v in state.items()}, False, {}, path)


def _mismatch(message: str, path: str | None) -> StateMismatchError:
    return StateMismatchError(f"optimizer checkpoint does not fit the optimizer: {message}", path=path)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# The shape torch's own optimizers give each state tensor, from the parameter's shape and the
# number of elements of its param group: a file without parameter shapes (a torch file,
# ColossalAI's layout) is checked against these, so a checkpoint of another model is refused
# before anything is loaded. Optimizers not listed (other libraries', subclasses) are not checked.
ShapeRule = Callable[[str, tuple[int, ...], int], tuple[int, ...]]


def _elementwise(state_name: str, shape: tuple[int, ...], group_numel: int) -> tuple[int, ...]:
    return shape


def _factored(state_name: str, shape: tuple[int, ...], group_numel: int) -> tuple[int, ...]:
    """Adafactor: row and column statistics of a matrix (or of the last two dims)."""
    if len(shape) >= 2 and state_name == "row_var":
        return (*shape[:-1], 1)
    if len(shape) >= 2 and state_name == "col_var":
        return (*shape[:-2], 1, shape[-1])
    return shape


def _flat(state_name: str, shape: tuple[int, ...], group_numel: int) -> tuple[int, ...]:
    """LBFGS: one flat vector over every parameter (``d``, ``old_dirs[i]``...), kept on the first."""
    return (group_numel,)


_ELEMENTWISE = ("SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop")
_ELEMENTWISE += ("Rprop", "SparseAdam", "Muon")
STATE_SHAPES: dict[type, ShapeRule] = {
    cls: rule
    for names, rule in ((_ELEMENTWISE, _elementwise), (("Adafactor",), _factored), (("LBFGS",), _flat))
    for name in names
    if isinstance(cls := getattr(torch.optim, name, None), type)
}


def merge_descriptions(descriptions: list[dict[str, Any]]) -> dict[str, Any]:
    """One description for optimizers that each hold some of a model's parameters (pipeline
    stages, in stage order): group ``g`` lists every optimizer's parameters of its group ``g``,
    state and shapes are joined. The groups' settings must agree (they are one optimizer's)."""
    first = descriptions[0]
    groups = [dict(g, params=list(g["params"])) for g in first["param_groups"]]
    state, shapes = dict(first["state"]), dict(first.get("param_shapes") or {})
    for other in descriptions[1:]:
        if len(other["param_groups"]) != len(groups):
            raise CheckpointFormatError(
                f"the ranks' optimizers have {len(groups)} and {len(other['param_groups'])} param groups; "
                "build every stage's optimizer with the same groups (empty ones included)"
            )
        for g, (mine, theirs) in enumerate(zip(groups, other["param_groups"])):
            settings = {k: v for k, v in theirs.items() if k != "params"}
            if settings != {k: v for k, v in mine.items() if k != "params"}:
                raise CheckpointFormatError(f"param group {g} has different settings on different ranks: {settings}")
            mine["params"] += [p for p in theirs["params"] if p not in set(mine["params"])]
        state.update(other["state"])
        shapes.update(other.get("param_shapes") or {})
    merged = dict(first, param_groups=groups, state=state)
    merged["format_version"] = max(d["format_version"] for d in descriptions)
    merged["named"] = all(d["named"] for d in descriptions)
    if shapes:
        merged["param_shapes"] = shapes
    return merged


def match_saved_to_live(
    saved: SavedOptimizer,
    optimizer: torch.optim.Optimizer,
    names: list[str] | None,
    *,
    partial: bool = False,
) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """Check ``saved`` against the live optimizer and build the ``state_dict`` to load.

    Returns ``(state_dict, params)``: the skeleton (state keyed by the live positional ids,
    tensors possibly still :class:`TensorRef`; each group's hyper-parameters from the file,
    so ``lr``, ``initial_lr`` and every setting come back) and the live parameter of each id.
    Parameters are matched by name when both sides have names, else by position; the first
    missing, unexpected or wrongly shaped parameter raises :class:`StateMismatchError`.
    ``partial``: the optimizer holds some of the saved parameters (a pipeline stage): saved
    parameters it lacks are not unexpected here (the caller checks that some rank holds each).
    """
    live_groups = optimizer_params(optimizer)
    path = saved.path
    if len(saved.groups) != len(live_groups):
        raise _mismatch(f"it has {len(saved.groups)} param groups, the optimizer has {len(live_groups)}", path)
    by_name = saved.named and names is not None
    if partial and not by_name:
        raise _mismatch(
            "an optimizer holding some of the parameters (a pipeline stage) loads by parameter name, and "
            + ("the checkpoint names none" if not saved.named else "the optimizer's parameters have no names")
            + " (boost the model together with the optimizer)",
            path,
        )
    live_ids: dict[int, torch.Tensor] = {}
    state: dict[int, dict[str, Any]] = {}
    out_groups = []
    rule = STATE_SHAPES.get(type(optimizer))
    pid = 0
    for g, (sgroup, lgroup) in enumerate(zip(saved.groups, live_groups)):
        group_numel = sum(p.numel() for p in lgroup)
        skeys = sgroup["params"]
        if by_name:
            lkeys = [names[pid + j] for j in range(len(lgroup))]  # type: ignore[index]
            missing = [k for k in lkeys if k not in set(skeys)]
            if missing:
                where = _group_of(saved, missing[0])
                detail = f" (it is in param group {where})" if where is not None else ""
                raise _mismatch(f"parameter {missing[0]!r} of param group {g} is not in the checkpoint{detail}", path)
            extra = [k for k in skeys if k not in set(lkeys)]
            if extra and not partial:
                raise _mismatch(f"checkpoint parameter {extra[0]!r} (param group {g}) is not in the optimizer", path)
        else:
            if len(skeys) != len(lgroup):
                raise _mismatch(
                    f"param group {g} has {len(skeys)} parameters in the checkpoint, {len(lgroup)} in the optimizer",
                    path,
                )
            lkeys = skeys
        ids = []
        for j, (key, param) in enumerate(zip(lkeys, lgroup)):
            label = names[pid + j] if names is not None else f"parameter {pid + j} (param group {g})"
            _check_param(saved, key, param, label, rule, group_numel, type(optimizer).__name__)
            live_ids[pid + j] = param
            if key in saved.state:
                state[pid + j] = dict(saved.state[key])
            ids.append(pid + j)
        pid += len(lgroup)
        body = {k: v for k, v in sgroup.items() if k != "params"}
        body["params"] = ids
        out_groups.append(body)
    return {"state": state, "param_groups": out_groups}, live_ids


def _group_of(saved: SavedOptimizer, key: str) -> int | None:
    for g, group in enumerate(saved.groups):
        if key in group["params"]:
            return g
    return None


def _check_param(
    saved: SavedOptimizer, key: str, param: torch.Tensor, label: str, rule: ShapeRule | None, numel: int, kind: str
) -> None:
    path = saved.path
    full = saved.param_shapes.get(key)
    if full is not None and tuple(full) != _shape(param):
        raise _mismatch(
            f"{label}: the optimizer's parameter has shape {list(param.shape)}, the checkpoint's has {list(full)}", path
        )
    if full is not None or rule is None:
        return
    for sname, value in saved.state.get(key, {}).items():
        for position, tensor in iter_tensors(value):
            if len(tensor.shape) == 0:
                continue  # scalars (step, LBFGS's ro[i]) say nothing about the parameter
            expected = rule(sname, _shape(param), numel)
            if tuple(tensor.shape) != expected:
                raise _mismatch(
                    f"{label}: state {describe_entry(sname, position)} has shape {list(tensor.shape)} in the "
                    f"checkpoint; {kind} keeps {list(expected)} for this parameter (shape {list(param.shape)})",
                    path,
                )


Reader = Callable[[TensorRef, torch.Tensor], torch.Tensor]


def materialize(state_dict: dict[str, Any], params: dict[int, torch.Tensor], read: Reader) -> dict[str, Any]:
    """Replace every :class:`TensorRef`, at any depth, by ``read(ref, live_param)``; returns the dict."""
    for pid, entries in state_dict["state"].items():
        for sname, value in entries.items():
            entries[sname] = map_tensors(value, lambda v, p=params[pid]: read(v, p) if isinstance(v, TensorRef) else v)
    return state_dict
