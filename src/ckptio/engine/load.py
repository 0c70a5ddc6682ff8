"""Loading a checkpoint's tensors into live ones, on every rank of a group at once.

The one read path of ckptio, whatever the world size. Every rank pairs each tensor of each
file with its live tensor from the headers alone (:func:`match_files`), so every missing,
unexpected or mismatching key is known before a single byte is copied and a strict load can
refuse with one complete report, the live state untouched; the verdict is the same on every
rank. Then each rank reads only the box it holds of each tensor (all of it for a replica or
one process), file by file in the order the bytes sit, ``num_threads`` files at once.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptio.engine.group import Group, collective_step, report_errors
from ckptio.engine.reader import FileHeader, TensorFile, read_header
from ckptio.engine.tensors import is_dtensor, local_part, local_region
from ckptio.errors import CheckpointCorruptError, StateMismatchError
from ckptio.layouts.detect import Located, detect
from ckptio.state.report import LoadReport, Mismatch, describe_tensor, match_keys, wrapper_prefix
from ckptio.storage.verify import check_against_manifest

# [(file, [(file_key, live_key), ...]), ...]: what to copy from where
CopyPlan = list[tuple[str, list[tuple[str, str]]]]


def read_headers(located: Located) -> dict[str, FileHeader]:
    """The header of every weights file of a checkpoint, parsed once for the match and the copy."""
    return {name: read_header(located.folder / name) for name in located.weight_files}


def match_files(
    located: Located,
    dest: dict[str, torch.Tensor],
    aliases: dict[str, str],
    files: dict[str, FileHeader] | None = None,
) -> tuple[CopyPlan, LoadReport]:
    """Pair every tensor of every file with its live tensor from the headers alone
    (``files``: the headers :func:`read_headers` gave, else read here)."""
    report = LoadReport()
    per_file: CopyPlan = []
    loaded: set[str] = set()
    index = located.index
    files = read_headers(located) if files is None else files
    headers = [(name, files[name].shapes) for name in located.weight_files]
    for name, shapes in headers:
        if index is not None:
            absent = [k for k, f in index.weight_map.items() if f == name and k not in shapes]
            if absent:
                raise CheckpointCorruptError(
                    f"index {Path(index.path).name} places {absent[:5]} in this shard but it does not hold them",
                    path=located.folder / name,
                )
    # one prefix for the whole checkpoint: per file (or per key) it could swap tensors
    prefix = wrapper_prefix((k for _, shapes in headers for k in shapes), dest)
    for name, shapes in headers:
        mapping, unexpected = match_keys(list(shapes), dest, prefix)
        report.unexpected_keys.extend(unexpected)
        todo = []
        for file_key, live_key in mapping.items():
            dtype, shape = shapes[file_key]
            live = dest[live_key]
            if live.dtype != dtype or tuple(live.shape) != tuple(shape):
                where = name if index is not None else ""
                found, expected = describe_tensor(dtype, shape), describe_tensor(live.dtype, live.shape)
                report.mismatched.append(Mismatch(live_key, expected, found, file=where))
                continue
            todo.append((file_key, live_key))
            loaded.add(live_key)
        per_file.append((name, todo))
    mismatched = {m.key for m in report.mismatched}
    for key in dest:
        if key not in loaded and key not in mismatched and aliases.get(key) not in loaded:
            report.missing_keys.append(key)
    return per_file, report


@dataclass
class _LoadPlan:
    located: Located
    per_file: CopyPlan
    report: LoadReport
    files: dict[str, FileHeader]


def _plan_load(checkpoint, dest: dict, aliases: dict[str, str], verify: bool) -> _LoadPlan:
    located = checkpoint if isinstance(checkpoint, Located) else detect(checkpoint, "model")
    files = read_headers(located)
    per_file, report = match_files(located, dest, aliases, files)
    # Each rank checks the sizes (and checksums) of the files it will read.
    check_against_manifest(located.folder, [name for name, todo in per_file if todo], checksums=verify)
    return _LoadPlan(located, per_file, report, files)


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


def load_state(
    dest: dict[str, torch.Tensor],
    checkpoint: str | os.PathLike | Located,
    group: Group,
    *,
    strict: bool = True,
    aliases: dict[str, str] | None = None,
    verify: bool = False,
    num_threads: int = 1,
) -> LoadReport:
    """Load a model checkpoint (any supported layout, saved at any world size) into the live
    tensors ``dest`` in place; each rank reads only the boxes it holds.

    Every rank reaches the same verdict on keys, shapes and dtypes; with ``strict=True`` a
    misfit raises :class:`StateMismatchError` on every rank before anything is written.
    """
    aliases = aliases or {}
    where = checkpoint.entry_path if isinstance(checkpoint, Located) else os.fspath(checkpoint)
    plan: _LoadPlan = collective_step(group, f"checking {where}", lambda: _plan_load(checkpoint, dest, aliases, verify))
    located = plan.located
    if strict and not plan.report.ok:
        raise StateMismatchError(
            f"checkpoint does not fit the model (strict=True): {plan.report.describe()}",
            path=where,
            report=plan.report,
        )
    error: BaseException | None = None
    work = [(name, todo) for name, todo in plan.per_file if todo]

    def copy(item: tuple[str, list[tuple[str, str]]]) -> None:
        _copy_file(located.folder, item[0], item[1], dest, plan.files[item[0]])

    try:
        if num_threads > 1 and len(work) > 1:
            with ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="ckptio-read") as pool:
                list(pool.map(copy, work))
        else:
            for item in work:
                copy(item)
    except Exception as exc:  # noqa: BLE001 (reported to every rank below)
        error = exc
    report_errors(group, f"loading {where}", error)
    return plan.report
