"""Loading a checkpoint's tensors into live ones, on every rank of a group at once.

The one read path of ckptio, whatever the world size. Every rank pairs each tensor of each
file with its live tensor from the headers alone (:func:`match_files`), so every missing,
unexpected or mismatching key is known before a single byte is copied and a strict load can
refuse with one complete report, the live state untouched; the verdict is the same on every
rank. Then each rank reads only the box it holds of each tensor (all of it for a replica or
one process), file by file in the order the bytes sit, ``num_threads`` files at once.

Modules' extra state (``<module>._extra_state``) is matched by key too (missing and unexpected
ones are reported like tensors), but never copied into a live tensor: its saved value (JSON
from the index or the file, or a tensor of the files read whole, whatever its shape) is handed
back with ``set_extra_state`` once the tensors are in, on every rank.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from ckptio.engine.group import Group, collective_step, gather_distinct, peer_failure, report_errors
from ckptio.engine.plan import replica_writers
from ckptio.engine.reader import FileHeader, TensorFile, is_safetensors, read_header
from ckptio.engine.tensors import is_dtensor, local_part, local_region
from ckptio.errors import CheckpointCorruptError, CheckpointError, StateMismatchError
from ckptio.formats import extra_state, safetensors_format
from ckptio.formats import frozen as frozen_format
from ckptio.formats.dtypes import cast_refusal, to_name
from ckptio.layouts.detect import Located, detect
from ckptio.state.report import (
    Cast,
    KeyMap,
    LoadReport,
    Mismatch,
    describe_tensor,
    key_mapper,
    match_keys,
    merge_reports,
    wrapper_prefix,
)
from ckptio.storage.reading import open_source
from ckptio.storage.verify import check_against_manifest

# [(file, [(file_key, live_key), ...]), ...]: what to copy from where
CopyPlan = list[tuple[str, list[tuple[str, str]]]]


@dataclass(frozen=True)
class TensorAt:
    """An extra state saved as a tensor: read whole from ``file`` when it is handed back."""

    file: str
    key: str


class Matched(NamedTuple):
    """What :func:`match_files` found: the copies to make, the report, and for each live extra
    state (``<module>._extra_state``) its saved value, or where its tensor is."""

    per_file: CopyPlan
    report: LoadReport
    extra: dict[str, Any]


def read_headers(located: Located) -> dict[str, FileHeader]:
    """The header of every weights file of a checkpoint, parsed once for the match and the copy."""
    return {name: read_header(located.folder / name) for name in located.weight_files}


def _index_extra_state(located: Located) -> dict[str, Any]:
    index = located.index
    if index is None or extra_state.INDEX_KEY not in index.metadata:
        return {}
    return extra_state.decode(index.metadata[extra_state.INDEX_KEY], path=index.path)


def saved_extra_state(located: Located) -> dict[str, Any]:
    """Every extra state of a model checkpoint that is not a tensor, by its key in the files."""
    found = _index_extra_state(located)
    for name in located.weight_files:
        with TensorFile(located.folder / name) as tf:
            found.update(tf.extra_state())
    return found


def omitted_frozen(located: Located, files: dict[str, FileHeader] | None = None) -> list[str]:
    """The keys a trainable-only checkpoint left out because they were frozen (its index's
    metadata, or its one safetensors file's), as the checkpoint names them; [] for a full one.
    ``files``: headers already parsed (:func:`read_headers`), whose metadata is used when there."""
    if located.index is not None:
        return frozen_format.from_index(located.index.metadata, path=located.index.path)
    if located.entry is None:
        return []
    known = (files or {}).get(located.entry)
    if known is not None and known.parsed is not None:
        return frozen_format.from_metadata(known.parsed.metadata, path=located.entry_path)
    if not is_safetensors(located.entry_path):
        return []
    path = located.entry_path
    with safetensors_format.SafetensorsReader.open(path, open_source(path)) as reader:  # a URL's: by byte ranges
        return frozen_format.from_metadata(reader.metadata, path=path)


def match_files(
    located: Located,
    dest: dict[str, torch.Tensor],
    aliases: dict[str, str],
    *,
    key_map: KeyMap | None = None,
    allow_dtype_cast: bool = True,
    extra: Collection[str] = (),
    files: dict[str, FileHeader] | None = None,
) -> Matched:
    """Pair every tensor of every file with its live tensor from the headers alone, and every
    saved extra state with a live one among ``extra`` (keys of modules' extra state, whose value
    is handed back whole, whatever its type or shape).

    Checkpoint keys go through the wrapper prefix (one for the whole checkpoint) and then
    ``key_map``; keys it drops are neither loaded nor unexpected, and live keys nothing maps to
    are missing. A dtype difference is a cast (listed in ``report.cast``) unless
    ``allow_dtype_cast`` is False or the cast would change values (:func:`cast_refusal`): then
    it is a mismatch, like a shape difference. Tied live tensors (``aliases``: alias -> first
    name) are one tensor: loading it under any of its names loads them all. ``files``: the
    headers :func:`read_headers` gave (else read here).
    """
    report = LoadReport()
    per_file: CopyPlan = []
    loaded: set[str] = set()
    found: dict[str, Any] = {}
    extra = set(extra)
    index = located.index
    to_model = key_mapper(key_map)
    files = read_headers(located) if files is None else files
    headers = [(name, files[name].shapes, files[name].extra) for name in located.weight_files]
    saved_extra = _index_extra_state(located)
    for name, shapes, values in headers:
        saved_extra.update(values)
        if index is not None:
            absent = [k for k, f in index.weight_map.items() if f == name and k not in shapes]
            if absent:
                raise CheckpointCorruptError(
                    f"index {Path(index.path).name} places {absent[:5]} in this shard but it does not hold them",
                    path=located.folder / name,
                )
    live_keys = set(dest) | extra
    # one prefix for the whole checkpoint: per file (or per key) it could swap tensors
    prefix = wrapper_prefix([*(k for _, shapes, _ in headers for k in shapes), *saved_extra], live_keys, to_model)
    source: dict[str, str] = {}  # live key -> the checkpoint key loaded into it
    for name, shapes, _ in headers:
        mapping, unexpected, dropped = match_keys(list(shapes), live_keys, prefix, to_model)
        report.unexpected_keys.extend(unexpected)
        report.dropped_keys.extend(dropped)
        where = name if index is not None else ""
        todo = []
        for file_key, live_key in mapping.items():
            if source.setdefault(live_key, file_key) != file_key:
                raise StateMismatchError(
                    f"key_map maps both {source[live_key]!r} and {file_key!r} to the model's {live_key!r}",
                    path=located.entry_path,
                )
            if live_key in extra:
                found[live_key] = TensorAt(name, file_key)
                continue
            dtype, shape = shapes[file_key]
            live = dest[live_key]
            refusal = None
            if live.dtype != dtype:
                refusal = cast_refusal(dtype, live.dtype) if allow_dtype_cast else "allow_dtype_cast=False"
            same_shape = tuple(live.shape) == tuple(shape)
            if not same_shape or refusal is not None:
                found_desc, expected = describe_tensor(dtype, shape), describe_tensor(live.dtype, live.shape)
                reason = (refusal or "") if same_shape else ""  # a shape difference says it all
                report.mismatched.append(Mismatch(live_key, expected, found_desc, file=where, reason=reason))
                continue
            if live.dtype != dtype:
                report.cast.append(Cast(live_key, to_name(dtype), to_name(live.dtype), file=where))
            todo.append((file_key, live_key))
            loaded.add(live_key)
        per_file.append((name, todo))
    mapping, unexpected, dropped = match_keys(list(saved_extra), extra, prefix, to_model)
    report.unexpected_keys.extend(unexpected)
    report.dropped_keys.extend(dropped)
    found.update({live_key: saved_extra[file_key] for file_key, live_key in mapping.items()})
    # a tied tensor is loaded (or mismatched) under any of its names
    loaded_ties = {aliases.get(k, k) for k in loaded}
    mismatched_ties = {aliases.get(m.key, m.key) for m in report.mismatched}
    # what a trainable-only checkpoint says it left out (frozen when saved), in the model's names
    left_out = set(match_keys(omitted_frozen(located, files), live_keys, prefix, to_model)[0].values())
    left_out |= {aliases.get(k, k) for k in left_out}
    for key in dest:
        tie = aliases.get(key, key)
        if tie not in loaded_ties and tie not in mismatched_ties:
            (report.frozen_keys if key in left_out or tie in left_out else report.missing_keys).append(key)
    report.missing_keys.extend(key for key in extra if key not in found)
    return Matched(per_file, report, found)


def _on_meta(t: torch.Tensor) -> bool:
    return (local_part(t) if is_dtensor(t) else t).device.type == "meta"


def _check_materializable(dest: dict[str, torch.Tensor], per_file: CopyPlan, where) -> None:
    """Refuse, before anything is read, a meta tensor the load could not replace in place."""
    for _, todo in per_file:
        for _, live_key in todo:
            t = dest[live_key]
            if not _on_meta(t):
                continue
            problem = None
            if is_dtensor(t):
                problem = "is a DTensor on the meta device (materialise the sharded model with model.to_empty(...))"
            elif isinstance(t, torch.nn.Parameter) and type(t) is not torch.nn.Parameter:
                problem = f"is a {type(t).__name__} (only plain tensors and nn.Parameter are materialised)"
            elif weakref.getweakrefs(t) or t._use_count() > 2:  # torch.utils.swap_tensors' condition
                problem = "is referenced elsewhere (a view or a weak reference), so it cannot be replaced in place"
            if problem is not None:
                raise CheckpointError(
                    f"model tensor {live_key!r} is on the meta device and {problem}; "
                    "move the model to a device first (model.to_empty(device='cpu'))",
                    path=where,
                )


def _cpu_replacements(dest: dict[str, torch.Tensor], per_file: CopyPlan) -> dict[int, tuple[torch.Tensor, ...]]:
    """For each meta tensor the load writes: ``id -> (meta tensor, new CPU tensor of its class)``
    (one per object, so tied names share it)."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for _, todo in per_file:
        for _, live_key in todo:
            t = dest[live_key]
            if id(t) in out or not _on_meta(t):
                continue
            real = torch.empty_like(t, device="cpu")
            if isinstance(t, torch.nn.Parameter):
                real = torch.nn.Parameter(real, requires_grad=t.requires_grad)
            out[id(t)] = (t, real)
    return out


@dataclass
class _LoadPlan:
    located: Located
    per_file: CopyPlan
    report: LoadReport
    extra: dict[str, Any]
    files: dict[str, FileHeader]


def _plan_load(
    checkpoint, dest: dict, aliases: dict[str, str], verify: bool, key_map, allow_dtype_cast, extra: Collection[str]
) -> _LoadPlan:
    located = checkpoint if isinstance(checkpoint, Located) else detect(checkpoint, "model")
    files = read_headers(located)
    per_file, report, found = match_files(
        located, dest, aliases, key_map=key_map, allow_dtype_cast=allow_dtype_cast, extra=extra, files=files
    )
    _check_materializable(dest, per_file, located.entry_path)
    # Each rank checks the sizes (and checksums) of the files it will read.
    reads = {name for name, todo in per_file if todo} | {v.file for v in found.values() if isinstance(v, TensorAt)}
    check_against_manifest(located.folder, sorted(reads), checksums=verify)
    return _LoadPlan(located, per_file, report, found, files)


def _hand_back(folder: Path, found: dict[str, Any], modules: dict[str, nn.Module]) -> None:
    """``set_extra_state`` on every module whose extra state was saved (tensors read whole now)."""
    for key, module in modules.items():
        if key not in found:
            continue
        value = found[key]
        if isinstance(value, TensorAt):
            with TensorFile(folder / value.file) as reader:
                value = reader.read(value.key).clone()  # never a view of a mapped file the module keeps
        try:
            module.set_extra_state(value)
        except Exception as exc:  # noqa: BLE001 (any refusal of the module's own code)
            raise StateMismatchError(
                f"{key}: {type(module).__name__}.set_extra_state refused the saved extra state: {exc!r}", path=folder
            ) from exc


def _copy_into(reader: TensorFile, file_key: str, live: torch.Tensor) -> None:
    if not is_dtensor(live):
        reader.copy_into(file_key, live.detach())
        return
    region = local_region(live)
    local = local_part(live).detach()
    if region.box:
        if region.numel:
            reader.read_box(file_key, region, local)
        return
    from torch.distributed.tensor import distribute_tensor

    full = reader.read(file_key)
    local.copy_(distribute_tensor(full, live.device_mesh, live.placements, src_data_rank=None).to_local())


def _copy_file(folder: Path, name: str, todo: list[tuple[str, str]], dest: dict, header: FileHeader) -> None:
    if not todo:
        return
    with TensorFile(folder / name, header) as reader, torch.no_grad():
        plain = [(k, dest[live].detach()) for k, live in todo if not is_dtensor(dest[live])]
        reader.copy_all(plain)  # in file order, runs of small tensors in one read each
        sharded = [(k, live) for k, live in todo if is_dtensor(dest[live])]
        order = {k: i for i, k in enumerate(reader.in_file_order([k for k, _ in sharded]))}
        for file_key, live_key in sorted(sharded, key=lambda kv: order[kv[0]]):
            _copy_into(reader, file_key, dest[live_key])


def replica_readers(per_file: CopyPlan, targets: dict, group: Group) -> dict[str, int]:
    """Which rank reads each replicated tensor (a plain tensor every rank holds, as under DDP):
    one rank per tensor, balanced by bytes, so each byte is read from storage once in all;
    :func:`share_replicas` then sends it to the others. Empty in a world of one."""
    if not group.active:
        return {}
    keys = [k for _, todo in per_file for _, k in todo if not is_dtensor(targets[k])]
    return replica_writers([(k, targets[k].numel() * targets[k].element_size()) for k in keys], group.size)


def share_replicas(readers: dict[str, int], targets: dict, group: Group) -> None:
    """Every replica, from the rank that read it to all the others (one broadcast each, in key
    order: the same on every rank)."""
    with peer_failure("sending replicated tensors to the ranks that did not read them"), torch.no_grad():
        for key in sorted(readers):
            tensor = targets[key]
            buf = tensor.detach() if tensor.is_contiguous() else tensor.detach().contiguous()
            dist.broadcast(buf, src=group.global_rank(readers[key]), group=group.group)
            if buf is not tensor and buf.data_ptr() != tensor.data_ptr():
                tensor.detach().copy_(buf)


def load_state(
    dest: dict[str, torch.Tensor],
    checkpoint: str | os.PathLike | Located,
    group: Group,
    *,
    strict: bool = True,
    aliases: dict[str, str] | None = None,
    verify: bool = False,
    num_threads: int = 1,
    key_map: KeyMap | None = None,
    allow_dtype_cast: bool = True,
    extra: dict[str, nn.Module] | None = None,
    keys_differ: bool = False,
) -> LoadReport:
    """Load a model checkpoint (any supported layout, saved at any world size) into the live
    tensors ``dest`` in place; each rank reads only the boxes it holds. ``extra``: the modules
    whose extra state is handed back (``set_extra_state``) once the tensors are in, on every rank.

    Every rank reaches the same verdict on keys, shapes and dtypes (see :func:`match_files` for
    ``key_map`` and ``allow_dtype_cast``); with ``strict=True`` a misfit raises
    :class:`StateMismatchError` on every rank before anything is written. A live tensor on the
    ``meta`` device has no memory to write into: it is loaded into a new CPU tensor that then
    takes its place (``torch.utils.swap_tensors``: the same Python object, so tied names, modules
    and optimizers that hold it see the loaded values), as ``load_state_dict(assign=True)``
    does; one the load does not write stays on ``meta`` (and is reported missing).

    ``keys_differ``: the ranks' models hold different keys (pipeline stages): each rank loads the
    keys it holds, and the report (the same on every rank) is the whole model's
    (:func:`~ckptio.state.report.merge_reports`: a checkpoint key is unexpected only when no rank
    takes it). Replicas are then read by every rank that holds them.
    """
    aliases = aliases or {}
    extra = extra or {}
    where = checkpoint.entry_path if isinstance(checkpoint, Located) else os.fspath(checkpoint)
    plan: _LoadPlan = collective_step(
        group,
        f"checking {where}",
        lambda: _plan_load(checkpoint, dest, aliases, verify, key_map, allow_dtype_cast, extra),
    )
    located = plan.located
    if keys_differ:
        plan.report = merge_reports(gather_distinct(group, f"comparing what {where} fits", plan.report))
    if strict and not plan.report.ok:
        raise StateMismatchError(
            f"checkpoint does not fit the model (strict=True): {plan.report.describe()}",
            path=where,
            report=plan.report,
        )
    replacements = _cpu_replacements(dest, plan.per_file)
    targets = {k: replacements[id(t)][1] if id(t) in replacements else t for k, t in dest.items()}
    readers = replica_readers(plan.per_file, targets, group) if not keys_differ else {}
    rank = group.rank
    mine = [(name, [(f, k) for f, k in todo if readers.get(k, rank) == rank]) for name, todo in plan.per_file]
    work = [(name, todo) for name, todo in mine if todo]
    error: BaseException | None = None

    def copy(item: tuple[str, list[tuple[str, str]]]) -> None:
        _copy_file(located.folder, item[0], item[1], targets, plan.files[item[0]])

    try:
        if num_threads > 1 and len(work) > 1:
            with ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="ckptio-read") as pool:
                list(pool.map(copy, work))
        else:
            for item in work:
                copy(item)
        _hand_back(located.folder, plan.extra, extra)
    except Exception as exc:  # noqa: BLE001 (reported to every rank below)
        error = exc
    share_replicas(readers, targets, group)  # every rank, even after a local failure (reported below)
    report_errors(group, f"loading {where}", error)
    for meta, real in replacements.values():
        try:
            torch.utils.swap_tensors(meta, real)
        except RuntimeError as exc:
            raise CheckpointError(
                f"could not put the loaded tensor in place of a meta tensor: {exc}; move the model to a device "
                "first (model.to_empty(device='cpu'))",
                path=where,
            ) from exc
    return plan.report
