"""ColossalAI's optimizer layouts (SPEC §3), read and written.

A folder holding::

    pytorch_optim.bin.index.json   {"metadata": {"total_size": N, "param_groups": "pytorch_optim_group.bin"},
                                    "weight_map": {"0": "pytorch_optim-00001.bin", ...}}
    pytorch_optim_group.bin        torch.save(list of param groups, "params" = integer ids)
    pytorch_optim-00001.bin        torch.save({id: {state_name: tensor}}) for the ids it holds

With a prefix ``p`` (ColossalAI's rule, the prefix before the last extension):
``pytorch_optim.bin.index.p.json``, ``pytorch_optim_group.p.bin``, ``pytorch_optim.p-00001.bin``.
Ids are positional (the order of ``optimizer.state_dict()``); there are no names or shapes.
Files are read with ``weights_only=True``.

ColossalAI 0.5 with ``use_async=True`` writes safetensors instead, in its *flat* layout: keys
``state.<id>.<state name>``, and every value that is not a tensor (the param groups under the key
``param_groups``, a Python scalar) as a pickle inside a 1-D uint8 tensor, those keys listed in
``__metadata__["non_tensor_keys"]`` (a JSON string); ColossalAI leaves ``None`` entries out (ckptio
keeps them, pickled: both readers accept that). One file
(``optimizer.safetensors``, any name) holds the whole ``state_dict()``; a sharded folder has
``optimizer.safetensors.index.json`` (same index, same group file) and shards
``optimizer-00001.safetensors`` holding ``state.*`` keys only. The pickles are read by
:mod:`ckptio.formats.plain_pickle`, which refuses any that would run code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ckptio.errors import CheckpointCorruptError, CheckpointFormatError
from ckptio.formats import plain_pickle, safetensors_format, torch_format
from ckptio.formats.hf_index import ShardIndex, index_json, read_index
from ckptio.formats.naming import colossal_optimizer_names, colossal_shard_name
from ckptio.storage.base import FileRecord, FileWriter


def _state_bytes(value: Any) -> int:
    """Bytes of every tensor in a state entry, nested ones (LBFGS's history lists) included."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_state_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_state_bytes(v) for v in value)
    return 0


def entry_sizes(state_dict: dict[str, Any]) -> list[tuple[str, int]]:
    """``(id as a string, bytes of its state tensors)`` per parameter, in state order, for the shard splitter."""
    return [(str(pid), _state_bytes(entries)) for pid, entries in state_dict["state"].items()]


def write(
    writer: FileWriter,
    state_dict: dict[str, Any],
    shards: Sequence[Sequence[str]],
    *,
    prefix: str | None,
    subdir: str = "",
) -> list[FileRecord]:
    """Write ``optimizer.state_dict()`` (tensors on the CPU) in ColossalAI's layout; ``shards``
    lists the ids (as strings, see :func:`entry_sizes`) of each shard file."""
    states_name, index_name, group_file = colossal_optimizer_names(prefix)
    base = f"{subdir}/" if subdir else ""
    state = state_dict["state"]
    by_key = {str(pid): pid for pid in state}
    sizes = dict(entry_sizes(state_dict))
    records = []
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(shards):
        if not keys:
            continue
        name = colossal_shard_name(states_name, i)
        with writer.open_stream(base + name) as stream:
            torch_format.save({by_key[k]: state[by_key[k]] for k in keys}, stream)
        records.append(stream.record)
        weight_map.update(dict.fromkeys(keys, name))
    with writer.open_stream(base + group_file) as stream:
        torch_format.save(state_dict["param_groups"], stream)
    records.append(stream.record)
    body = index_json(weight_map, sum(sizes.values()), {"param_groups": group_file})
    records.append(writer.write(base + index_name, [body]))
    return records


def read(index_path: str | Path) -> tuple[dict[str, Any], ShardIndex]:
    """Read the whole layout back into ``({"state": {id: {...}}, "param_groups": [...]}, index)``."""
    index = read_index(index_path)
    folder = Path(index_path).parent
    group_file = index.metadata.get("param_groups")
    if not isinstance(group_file, str):
        raise CheckpointFormatError("optimizer index has no metadata.param_groups file name", path=index_path)
    if (folder / group_file).resolve().parent != folder.resolve():
        raise CheckpointFormatError(f"param group file {group_file!r} is outside the folder", path=index_path)
    groups = torch_format.load(folder / group_file)
    if not isinstance(groups, list):
        raise CheckpointFormatError("param group file must hold a list of groups", path=folder / group_file)
    state: dict[Any, dict[str, Any]] = {}
    for shard in index.shard_files:
        if shard.lower().endswith(".safetensors"):
            part, _ = read_flat(folder / shard)
        else:
            part = torch_format.load(folder / shard, mmap=True)
        if not isinstance(part, dict) or not all(isinstance(v, dict) for v in part.values()):
            raise CheckpointFormatError("shard must hold {param_id: {state_name: value}}", path=folder / shard)
        listed = {k for k, f in index.weight_map.items() if f == shard}
        absent = listed - {str(k) for k in part}
        if absent:
            raise CheckpointCorruptError(
                f"index places ids {sorted(absent)[:5]} in this shard but it lacks them", path=folder / shard
            )
        state.update(part)
    return {"state": state, "param_groups": groups}, index


# ----------------------------------------------------------------------------- the flat safetensors layout
FLAT_GROUPS_KEY = "param_groups"
NON_TENSOR_KEYS = "non_tensor_keys"
_FLAT_KEY_RE = re.compile(r"^state\.(\d+)\.([^.]+)$")


def check_flat(state_dict: dict[str, Any], *, path: str | Path | None = None) -> None:
    """Refuse, before anything is written, what the flat layout cannot hold so that both
    ColossalAI and ckptio read it back: state names with a dot (ColossalAI splits keys on dots)
    and values that are neither tensors nor plain values (tensors inside lists, objects)."""
    for pid, entries in state_dict["state"].items():
        for name, value in entries.items():
            if not isinstance(name, str) or not name or "." in name:
                raise CheckpointFormatError(
                    f"state name {name!r} of parameter {pid} cannot be a key of ColossalAI's one-file safetensors "
                    "layout (state.<id>.<name>, no dots); save to a .bin file or with shard=True",
                    path=path,
                )
            if not isinstance(value, torch.Tensor) and not plain_pickle.is_plain(value):
                raise CheckpointFormatError(
                    f"state {name!r} of parameter {pid} is a {type(value).__name__} holding tensors or objects; "
                    "ColossalAI's one-file safetensors layout keeps tensors and plain values only (numbers, "
                    "strings, lists, dicts); save to a .bin file or with shard=True",
                    path=path,
                )
    for g, group in enumerate(state_dict["param_groups"]):
        if not plain_pickle.is_plain(group):
            raise CheckpointFormatError(
                f"param group {g} holds a value that is not plain (a tensor lr?); ColossalAI's one-file "
                "safetensors layout pickles the groups and ckptio reads plain values only; save to a .bin file",
                path=path,
            )


def _pickled(value: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(plain_pickle.dumps(value)), dtype=torch.uint8)


def write_flat(writer: FileWriter, name: str, state_dict: dict[str, Any]) -> FileRecord:
    """One safetensors file of a full ``state_dict()`` (CPU tensors) in the flat layout, as
    ColossalAI writes it (``None`` entries are kept as pickles, which its reader also accepts)."""
    check_flat(state_dict, path=name)
    entries: list[tuple[str, torch.Tensor]] = []
    non_tensor: list[str] = []
    for pid, states in state_dict["state"].items():
        for sname, value in states.items():
            key = f"state.{pid}.{sname}"
            if not isinstance(value, torch.Tensor):
                value = _pickled(value)
                non_tensor.append(key)
            entries.append((key, value))
    entries.append((FLAT_GROUPS_KEY, _pickled(state_dict["param_groups"])))
    non_tensor.append(FLAT_GROUPS_KEY)
    metadata = {"format": "pt", NON_TENSOR_KEYS: json.dumps(non_tensor)}
    return writer.write(name, safetensors_format.iter_file_chunks(entries, metadata))


def _non_tensor_keys(reader: safetensors_format.SafetensorsReader) -> set[str]:
    raw = reader.metadata.get(NON_TENSOR_KEYS)
    if raw is None:
        return set()
    try:
        keys = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointFormatError(f"__metadata__.{NON_TENSOR_KEYS} is not JSON: {exc}", path=reader.path) from exc
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointFormatError(f"__metadata__.{NON_TENSOR_KEYS} must be a list of keys", path=reader.path)
    absent = [k for k in keys if k not in reader.tensors]
    if absent:
        raise CheckpointCorruptError(f"__metadata__.{NON_TENSOR_KEYS} lists {absent[:3]}, absent from the file",
                                     path=reader.path)  # fmt: skip
    return set(keys)


def read_flat(path: str | Path) -> tuple[dict[int, dict[str, Any]], list | None]:
    """A flat safetensors file: ``({id: {state name: value}}, param groups or None for a shard)``."""
    with safetensors_format.SafetensorsReader.open(path) as reader:
        pickled = _non_tensor_keys(reader)
        state: dict[int, dict[str, Any]] = {}
        groups = None
        for key in list(reader.tensors):  # header order: the state's order
            match = _FLAT_KEY_RE.match(key)
            if match is None and key != FLAT_GROUPS_KEY:
                raise CheckpointFormatError(
                    f"key {key!r} is neither state.<id>.<state name> nor {FLAT_GROUPS_KEY!r}: not ColossalAI's "
                    "safetensors optimizer layout",
                    path=path,
                )
            value: Any = reader.read(key)
            if key in pickled:
                if value.dtype != torch.uint8 or value.dim() != 1:
                    raise CheckpointFormatError(
                        f"{key!r} is listed as pickled but is not a 1-D uint8 tensor", path=path
                    )
                value = plain_pickle.loads(value.numpy().tobytes(), path=path, what=repr(key))
            if match is None:
                groups = value
            else:
                state.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if groups is not None and not isinstance(groups, list):
        raise CheckpointFormatError(f"{FLAT_GROUPS_KEY!r} must hold a list of param groups", path=path)
    return state, groups


def read_flat_file(path: str | Path) -> dict[str, Any]:
    """The one-file flat layout as ``optimizer.state_dict()``."""
    state, groups = read_flat(path)
    if groups is None:
        raise CheckpointFormatError(
            f"holds no {FLAT_GROUPS_KEY!r}: a shard of a sharded optimizer? load its folder or index instead", path=path
        )
    return {"state": state, "param_groups": groups}
