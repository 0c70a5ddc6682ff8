"""Which entries of a DCP checkpoint are a model and which an optimizer.

``dcp.save`` flattens a nested state dict; ``.metadata`` keeps each key's path in it
(:attr:`ckptio.formats.dcp.Metadata.paths`), and that path decides, never the dots of a key:

* **model**: the entries under the first path segment named ``model``
  (``{"model": get_model_state_dict(m), "optim": ...}`` as ``get_state_dict`` users, accelerate and
  the DCP tutorial's ``{"app": {"model": ..., "optim": ...}}`` save it), named by the rest of their
  path (``model.layers.0.w`` -> ``layers.0.w``). With no such segment, the top-level entries that are
  not an optimizer's: torchtitan's step folders (it saves the model's state flattened at the top,
  next to ``optimizer``, ``lr_scheduler``, ``dataloader``, ``train_state``) and a plain
  ``dcp.save(model.state_dict())``.
* **optimizer**: the entries under the path that holds ``param_groups`` (and ``state``), in either
  of torch's forms: nested, as ``get_state_dict`` / ``get_optimizer_state_dict`` return it
  (``(..., "state", fqn, "exp_avg")``, ``(..., "param_groups", 0, "lr")`` with a ``params`` list of
  names), or flat, as torchtitan and ``StateDictOptions(flatten_optimizer_state_dict=True)`` write
  it (``(..., "state.<fqn>.exp_avg")``, ``(..., "param_groups.<fqn>.lr")``: one copy of its group's
  settings per parameter). Parameters are named as in the model (``get_state_dict``'s FQNs), which
  is how ckptio names them too.

Nothing else (LR schedulers, data loaders, train state) is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ckptio.errors import CheckpointFormatError, StateMismatchError
from ckptio.formats.dcp import Metadata
from ckptio.state.optimizer import SavedOptimizer, TensorRef

MODEL_SEGMENT = "model"
_STATE, _GROUPS = "state", "param_groups"

Path = tuple[str | int, ...]


def _keys(meta: Metadata) -> list[str]:
    """Every key in state dict order (``planner_data`` keeps it; the metadata's own order may not)."""
    keys = [k for k in meta.paths if k in meta.tensors or k in meta.values]
    seen = set(keys)
    return keys + [k for k in (*meta.tensors, *meta.values) if k not in seen]


def _join(segments: Path) -> str:
    return ".".join(str(s) for s in segments)


@dataclass(frozen=True)
class OptimizerPart:
    """Where an optimizer's entries are: under ``prefix``, nested or ``flat``; ``keys`` in order."""

    prefix: Path
    flat: bool
    keys: tuple[str, ...]


def optimizer_part(meta: Metadata) -> OptimizerPart | None:
    """The optimizer a DCP checkpoint holds, if any (one at most)."""
    found: dict[tuple[Path, bool], list[str]] = {}
    for key in _keys(meta):
        path = meta.path_of(key)
        for i in range(len(path) - 1):
            if path[i] in (_STATE, _GROUPS) and (path[i] == _STATE or type(path[i + 1]) is int):
                found.setdefault((path[:i], False), []).append(key)
                break
        else:
            last = path[-1]
            if isinstance(last, str) and (last.startswith(_STATE + ".") or last.startswith(_GROUPS + ".")):
                found.setdefault((path[:-1], True), []).append(key)
    # a place is an optimizer only with param groups in it (a model may have a submodule "state")
    parts = [
        OptimizerPart(prefix, flat, tuple(keys))
        for (prefix, flat), keys in found.items()
        if any(_is_group(meta.path_of(k)[len(prefix) :], flat) for k in keys)
    ]
    if len(parts) > 1:
        places = ", ".join(repr(_join(p.prefix) or "<top level>") for p in parts)
        raise CheckpointFormatError(f"holds several optimizer states (under {places})", path=meta.path)
    return parts[0] if parts else None


def _is_group(rel: Path, flat: bool) -> bool:
    if flat:
        return isinstance(rel[0], str) and rel[0].startswith(_GROUPS + ".")
    return rel[0] == _GROUPS


def model_keys(meta: Metadata) -> dict[str, str]:
    """``{model key: DCP key}`` of the model's entries (tensors and values), in state dict order."""
    keys = _keys(meta)
    prefix = _model_prefix(meta, keys)
    if prefix is not None:
        n = len(prefix)
        return {_join(p[n:]): k for k in keys if len(p := meta.path_of(k)) > n and p[:n] == prefix}
    optimizer = optimizer_part(meta)
    taken = set(optimizer.keys) if optimizer is not None else set()
    return {meta.path_of(k)[0]: k for k in keys if len(meta.path_of(k)) == 1 and k not in taken}


def _model_prefix(meta: Metadata, keys: list[str]) -> Path | None:
    candidates = set()
    for key in keys:
        path = meta.path_of(key)
        for i, segment in enumerate(path[:-1]):
            if segment == MODEL_SEGMENT:
                candidates.add(path[: i + 1])
                break
    if not candidates:
        return None
    shortest = min(len(c) for c in candidates)
    best = sorted(c for c in candidates if len(c) == shortest)
    if len(best) > 1:
        raise CheckpointFormatError(
            f"holds several models (under {', '.join(repr(_join(c)) for c in best)})", path=meta.path
        )
    return best[0]


def kind_of(meta: Metadata) -> str | None:
    """``"model"`` when it holds model tensors, else ``"optimizer"`` when it holds an optimizer, else None."""
    if any(k in meta.tensors for k in model_keys(meta).values()):
        return "model"
    return "optimizer" if optimizer_part(meta) is not None else None


# ----------------------------------------------------------------------------- the optimizer
Read = Callable[[str], Any]


def _put(container: dict, segments: Path, value: Any) -> None:
    for segment in segments[:-1]:
        container = container.setdefault(segment, {})
    container[segments[-1]] = value


def _listed(value: Any) -> Any:
    """Nested dicts keyed 0..n-1 (how DCP flattened a list) back into lists."""
    if not isinstance(value, dict):
        return value
    value = {k: _listed(v) for k, v in value.items()}
    if value and all(type(k) is int for k in value) and sorted(value) == list(range(len(value))):
        return [value[i] for i in range(len(value))]
    return value


def saved_optimizer(
    meta: Metadata,
    read: Read,
    names: list[str] | None,
    group_sizes: list[int],
) -> SavedOptimizer:
    """The optimizer of a DCP checkpoint as a :class:`SavedOptimizer` (state tensors as
    :class:`TensorRef` keyed by their DCP key; ``read(key)`` gives any other entry's value).

    The flat form keeps no groups, only each parameter's copy of its group's settings: the
    groups are those of the live optimizer (``names`` in its order, else the file's order cut
    into ``group_sizes``), and every parameter of a group must have the same settings.
    """
    part = optimizer_part(meta)
    if part is None:
        raise CheckpointFormatError("holds no optimizer state (no 'param_groups' entries)", path=meta.path)
    n = len(part.prefix)

    def value(key: str) -> Any:
        tensor = meta.tensors.get(key)
        if tensor is not None:
            return TensorRef(key, tensor.dtype, tensor.shape)
        return read(key)

    if not part.flat:
        groups: dict[int, dict] = {}
        state: dict[str, dict] = {}
        for key in part.keys:
            rel = meta.path_of(key)[n:]
            if rel[0] == _GROUPS and len(rel) >= 3:
                _put(groups.setdefault(rel[1], {}), rel[2:], read(key))  # settings: values, never refs
            elif rel[0] == _STATE and len(rel) >= 3 and isinstance(rel[1], str):
                _put(state.setdefault(rel[1], {}), rel[2:], value(key))
        ordered = [_listed(groups[g]) for g in sorted(groups)]
        for g, group in enumerate(ordered):
            if not isinstance(group.get("params"), list) or not all(isinstance(p, str) for p in group["params"]):
                raise CheckpointFormatError(f"param group {g} has no list of parameter names", path=meta.path)
        return SavedOptimizer(ordered, {k: _listed(v) for k, v in state.items()}, True, {}, str(meta.path))
    return _flat(meta, part, value, read, names, group_sizes)


def _flat(meta: Metadata, part: OptimizerPart, value: Read, read: Read, names, group_sizes) -> SavedOptimizer:
    n = len(part.prefix)
    settings: dict[str, dict[str, str]] = {}  # fqn -> setting -> DCP key
    state_keys: list[tuple[str, str]] = []
    for key in part.keys:
        rel = meta.path_of(key)[n]
        if rel.startswith(_GROUPS + "."):
            fqn, _, setting = rel[len(_GROUPS) + 1 :].rpartition(".")
            settings.setdefault(fqn, {})[setting] = key
        else:
            state_keys.append((rel[len(_STATE) + 1 :], key))
    fqns = list(settings)
    by_length = sorted(fqns, key=len, reverse=True)
    state: dict[str, dict] = {}
    for rest, key in state_keys:
        fqn = next((f for f in by_length if rest.startswith(f + ".")), None)
        if fqn is None:
            raise CheckpointFormatError(f"state entry {rest!r} is of no parameter in the param groups", path=meta.path)
        _put(state.setdefault(fqn, {}), tuple(rest[len(fqn) + 1 :].split(".")), value(key))
    if names is not None:
        members, start = [], 0
        for size in group_sizes:
            members.append([f for f in names[start : start + size] if f in settings])
            start += size
        placed = {f for group in members for f in group}
        if members:
            members[-1] += [f for f in fqns if f not in placed]  # reported as not in the optimizer
    else:
        if sum(group_sizes) != len(fqns):
            raise StateMismatchError(
                f"optimizer checkpoint holds {len(fqns)} parameters, the optimizer has {sum(group_sizes)}",
                path=meta.path,
            )
        members, start = [], 0
        for size in group_sizes:
            members.append(fqns[start : start + size])
            start += size
    groups = [_group_settings(meta, g, group, settings, read) for g, group in enumerate(members)]
    return SavedOptimizer(groups, {k: _listed(v) for k, v in state.items()}, True, {}, str(meta.path))


def _group_settings(meta: Metadata, g: int, members: list[str], settings, read: Read) -> dict[str, Any]:
    """One group's settings, the same for each of its parameters (else the groups differ from the live ones)."""
    body: dict[str, Any] = {}
    for i, fqn in enumerate(members):
        mine = {setting: read(key) for setting, key in settings[fqn].items()}
        if i == 0:
            body = mine
        elif not _same(mine, body):
            diff = sorted(k for k in mine.keys() | body.keys() if not _same(mine.get(k), body.get(k)))
            raise StateMismatchError(
                f"optimizer checkpoint gives {fqn!r} other settings ({diff}) than {members[0]!r}, but the optimizer "
                f"has them in one param group ({g})",
                path=meta.path,
            )
    body["params"] = list(members)
    return body


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b
