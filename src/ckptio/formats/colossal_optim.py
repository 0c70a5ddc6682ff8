"""ColossalAI's sharded optimizer layout (SPEC §3), read and written.

A folder holding::

    pytorch_optim.bin.index.json   {"metadata": {"total_size": N, "param_groups": "pytorch_optim_group.bin"},
                                    "weight_map": {"0": "pytorch_optim-00001.bin", ...}}
    pytorch_optim_group.bin        torch.save(list of param groups, "params" = integer ids)
    pytorch_optim-00001.bin        torch.save({id: {state_name: tensor}}) for the ids it holds

With a prefix ``p`` (ColossalAI's rule, the prefix before the last extension):
``pytorch_optim.bin.index.p.json``, ``pytorch_optim_group.p.bin``, ``pytorch_optim.p-00001.bin``.
Ids are positional (the order of ``optimizer.state_dict()``); there are no names or shapes.
Files are read with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ckptio.errors import CheckpointCorruptError, CheckpointFormatError
from ckptio.formats import torch_format
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
