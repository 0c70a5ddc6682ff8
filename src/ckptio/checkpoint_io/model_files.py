"""Model weights to files and back: plan the shards, format them, hand bytes to storage.

Saving: :func:`plan_model_files` (pure) -> :func:`write_model_files` (format + storage
writer) -> a commit (:mod:`ckptio.storage.atomic`). Loading: :func:`locate_model` finds the
layout, every file's header is checked against the live tensors before any byte is
copied (so ``strict=True`` fails before the model is touched), then shards are read one by
one straight into the live tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ckptio.checkpoint_io.model_state import (
    LoadReport,
    Mismatch,
    describe_tensor,
    wrapper_prefix,
)
from ckptio.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    StateMismatchError,
)
from ckptio.formats import naming, safetensors_format, torch_format
from ckptio.formats.hf_index import ShardIndex, index_json, read_index
from ckptio.planning.split import split_greedy
from ckptio.storage import atomic
from ckptio.storage.base import FileRecord, FileWriter
from ckptio.storage.location import is_url, on_local_path
from ckptio.storage.verify import check_against_manifest

MiB = 1024 * 1024
# Shard files written at once by one process (measured: 2 beats 1 on the 2-core reference machine).
WRITE_THREADS = 2
SAFETENSORS_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class ModelSaveOptions:
    shard: bool = False
    prefix: str | None = None
    max_shard_bytes: int = 1024 * MiB
    use_safetensors: bool = False

    @property
    def weights_name(self) -> str:
        return naming.weights_name(self.use_safetensors, self.prefix)

    @property
    def index_name(self) -> str:
        return naming.index_name(self.use_safetensors, self.prefix)


@dataclass(frozen=True)
class ModelFilePlan:
    """Which keys go in which file; ``index`` is None for a single file."""

    files: tuple[tuple[str, tuple[str, ...]], ...]
    weight_map: dict[str, str] | None
    total_size: int


def plan_model_files(sizes: list[tuple[str, int]], opts: ModelSaveOptions) -> ModelFilePlan:
    total = sum(n for _, n in sizes)
    if not opts.shard:
        return ModelFilePlan(((opts.weights_name, tuple(k for k, _ in sizes)),), None, total)
    plan = split_greedy(sizes, opts.max_shard_bytes)
    n = len(plan)
    files = tuple((naming.shard_name(opts.weights_name, i, n), keys) for i, keys in enumerate(plan.shards))
    weight_map = {key: name for name, keys in files for key in keys}
    return ModelFilePlan(files, weight_map, total)


def tensor_sizes(state: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    return [(k, t.numel() * t.element_size()) for k, t in state.items()]


def write_weights_file(
    writer: FileWriter, name: str, tensors: list[tuple[str, torch.Tensor]], *, use_safetensors: bool
) -> FileRecord:
    if use_safetensors:
        return writer.write(name, safetensors_format.iter_file_chunks(tensors, SAFETENSORS_METADATA))
    with writer.open_stream(name) as stream:
        torch_format.save(dict(tensors), stream)
    return stream.record


def write_model_files(
    writer: FileWriter,
    state: dict[str, torch.Tensor],
    opts: ModelSaveOptions,
    *,
    subdir: str = "",
    extra_files: dict[str, bytes] | None = None,
    plan: ModelFilePlan | None = None,
    which_files: Callable[[int], bool] = lambda i: True,
) -> list[FileRecord]:
    """Write the shards (those ``which_files`` selects), then the index and extra files.

    A multi-rank save calls this on every rank with its own ``which_files`` and the same
    ``plan``; only the rank that writes metadata passes ``extra_files`` and ``write_index``.
    """
    plan = plan or plan_model_files(tensor_sizes(state), opts)
    prefix = f"{subdir}/" if subdir else ""
    mine = [(prefix + name, keys) for i, (name, keys) in enumerate(plan.files) if which_files(i)]

    def write_one(item: tuple[str, tuple[str, ...]]) -> FileRecord:
        name, keys = item
        return write_weights_file(writer, name, [(k, state[k]) for k in keys], use_safetensors=opts.use_safetensors)

    threads = min(WRITE_THREADS, len(mine))
    if threads > 1:
        # Shards are written concurrently: file writes and hashing release the GIL, and two
        # files in flight keep the disk busy while the other thread fills the page cache.
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckptio-write") as pool:
            records = list(pool.map(write_one, mine))
    else:
        records = [write_one(item) for item in mine]
    if extra_files is not None:
        records.extend(write_model_metadata(writer, plan, opts, subdir=subdir, extra_files=extra_files))
    return records


def write_model_metadata(
    writer: FileWriter, plan: ModelFilePlan, opts: ModelSaveOptions, *, subdir: str = "", extra_files=None
) -> list[FileRecord]:
    prefix = f"{subdir}/" if subdir else ""
    records = []
    if plan.weight_map is not None:  # like ColossalAI, a sharded save always has an index
        body = index_json(plan.weight_map, plan.total_size, {"format": "ckptio", "format_version": 1})
        records.append(writer.write(prefix + opts.index_name, [body]))
    for name, body in (extra_files or {}).items():
        records.append(writer.write(prefix + name, [body]))
    return records


def model_owned_files(prefix: str | None, extra_files: Iterable[str] = ()) -> Callable[[str], bool]:
    """What a sharded model save replaces in an existing folder: weights and indexes of its
    prefix in either format (stale shards included), and the ``extra_files`` it writes.

    ``config.json`` is owned only by a save that writes one (a ``transformers`` model): a
    folder's own ``config.json`` beside a plain model's shards is the user's, and stays.
    """
    pattern = naming.model_files_pattern(prefix)
    extra = frozenset(extra_files)
    return lambda name: bool(pattern.match(name)) or name in extra


def save_model_state(
    state: dict[str, torch.Tensor],
    checkpoint: str | os.PathLike,
    opts: ModelSaveOptions,
    *,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Save a clean state dict to ``checkpoint`` (a file, or a folder when sharding)."""
    if is_url(checkpoint):  # object store: save a local copy, upload it, commit marker last
        on_local_path(checkpoint, lambda p: save_model_state(state, p, opts, extra_files=extra_files), save=True)
        return checkpoint
    if not opts.shard:
        commit = atomic.FileCommit(checkpoint).begin()
        with atomic.aborting_on_error(commit):
            tensors = list(state.items())
            record = write_weights_file(
                commit.writer,
                commit.staging_name,
                tensors,
                use_safetensors=_single_file_is_safetensors(checkpoint, opts),
            )
            return commit.commit(record)
    commit = atomic.FolderCommit(checkpoint, owns=model_owned_files(opts.prefix, extra_files or ())).begin()
    with atomic.aborting_on_error(commit):
        records = write_model_files(commit.writer, state, opts, extra_files=extra_files or {})
        return commit.commit(records)


def _single_file_is_safetensors(checkpoint, opts: ModelSaveOptions) -> bool:
    suffix = Path(checkpoint).suffix.lower()
    if suffix == ".safetensors":
        return True
    if suffix in (".bin", ".pt", ".pth"):
        return False
    return opts.use_safetensors


# ---------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ModelCheckpoint:
    """A located model checkpoint: its folder, its weight files, and its index if sharded."""

    folder: Path
    files: tuple[str, ...]
    index: ShardIndex | None

    @property
    def is_sharded(self) -> bool:
        return self.index is not None


def _pick_index(folder: Path, names: list[str]) -> str:
    if len(names) > 1:  # both formats of one save: prefer safetensors
        present = set(names)
        names = [n for n in names if naming.safetensors_twin(n) == n or naming.safetensors_twin(n) not in present]
    if len(names) > 1:
        raise CheckpointFormatError(
            f"folder holds several model indexes ({', '.join(sorted(names))}); pass the path of the index file to load",
            path=folder,
        )
    return names[0]


def locate_model(checkpoint: str | os.PathLike) -> ModelCheckpoint:
    """Find what ``checkpoint`` holds: one weights file, or an index and its shards."""
    path = Path(checkpoint)
    if not path.exists():
        with contextlib.suppress(OSError):
            atomic.recover(path)
    if path.is_file():
        if naming.is_index_file(path.name):
            index = read_index(path)
            return ModelCheckpoint(path.parent, tuple(index.shard_files), index)
        return ModelCheckpoint(path.parent, (path.name,), None)
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir() if not naming.is_temporary(p.name))
        indexes = [n for n in entries if naming.is_model_index(n)]
        if indexes:
            index = read_index(path / _pick_index(path, indexes))
            return ModelCheckpoint(path, tuple(index.shard_files), index)
        for single in (naming.SAFETENSORS_WEIGHTS, naming.BIN_WEIGHTS):
            if single in entries:
                return ModelCheckpoint(path, (single,), None)
        if naming.RUNNING_STATES in entries and naming.TRAINING_MODEL_DIR in entries:
            return locate_model(path / naming.TRAINING_MODEL_DIR)  # a training checkpoint: its model part
        raise CheckpointNotFoundError(
            "no model checkpoint in this folder: expected an index JSON "
            f"({naming.SAFETENSORS_INDEX} or {naming.BIN_INDEX}), {naming.SAFETENSORS_WEIGHTS} "
            f"or {naming.BIN_WEIGHTS}",
            path=path,
        )
    raise CheckpointNotFoundError("checkpoint does not exist", path=path)


def is_safetensors_file(path: str | os.PathLike) -> bool:
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        return True
    if suffix in (".bin", ".pt", ".pth"):
        return False
    with open(path, "rb") as fh:
        head = fh.read(9)
    return not (head.startswith(b"PK") or head[:1] == b"\x80")


class WeightsFile:
    """One weights file opened for reading, whatever its format."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise CheckpointNotFoundError("weights file named by the checkpoint is missing", path=path)
        self._st = safetensors_format.SafetensorsReader.open(path) if is_safetensors_file(path) else None
        self._torch: dict[str, torch.Tensor] | None = None

    def _torch_state(self) -> dict[str, torch.Tensor]:
        if self._torch is None:
            self._torch = torch_format.load_tensor_dict(self.path, mmap=True)
        return self._torch

    def shapes(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        if self._st is not None:
            return {k: (i.dtype, i.shape) for k, i in self._st.tensors.items()}
        return {k: (t.dtype, tuple(t.shape)) for k, t in self._torch_state().items()}

    def copy_into(self, key: str, dest: torch.Tensor) -> None:
        if self._st is not None:
            if dest.device.type == "cpu" and dest.is_contiguous() and type(dest) is torch.Tensor:
                self._st.read_into(key, dest)
            else:
                dest.copy_(self._st.read(key))
        else:
            dest.copy_(self._torch_state()[key])

    def in_file_order(self, todo: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``(file_key, live_key)`` pairs sorted by where the bytes sit, so a cold read is sequential."""
        if self._st is None:
            return todo
        return sorted(todo, key=lambda kv: self._st.tensors[kv[0]].start)

    def read(self, key: str) -> torch.Tensor:
        if self._st is not None:
            return self._st.read(key)
        return self._torch_state()[key]

    def close(self) -> None:
        if self._st is not None:
            self._st.close()
        self._torch = None


def match_keys(
    file_keys: list[str], dest: dict[str, torch.Tensor], prefix: str = ""
) -> tuple[dict[str, str], list[str]]:
    """Map file keys to live keys after dropping ``prefix`` (the checkpoint's wrapper prefix,
    see :func:`wrapper_prefix`) from each; return the mapping and the unexpected keys."""
    mapping, unexpected = {}, []
    for key in file_keys:
        live = key[len(prefix) :] if key.startswith(prefix) else key
        if live in dest:
            mapping[key] = live
        else:
            unexpected.append(key)
    return mapping, unexpected


def _weights_file_shapes(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    weights = WeightsFile(path)
    try:
        return weights.shapes()
    finally:
        weights.close()


def match_files_to_model(
    ck: ModelCheckpoint,
    dest: dict[str, torch.Tensor],
    aliases: dict[str, str],
    read_shapes: Callable[[Path], dict[str, tuple[torch.dtype, tuple[int, ...]]]],
) -> tuple[list[tuple[str, list[tuple[str, str]]]], LoadReport]:
    """Pair every tensor of every file with its live tensor from the headers alone.

    All missing, unexpected and mismatching keys are collected before a single byte is copied,
    so a strict load can refuse with one complete report and leave the model untouched.
    Returns ``[(file, [(file_key, live_key), ...]), ...]`` and the report.
    """
    report = LoadReport()
    per_file: list[tuple[str, list[tuple[str, str]]]] = []
    loaded: set[str] = set()
    headers = [(name, read_shapes(ck.folder / name)) for name in ck.files]
    for name, shapes in headers:
        if ck.index is not None:
            absent = [k for k, f in ck.index.weight_map.items() if f == name and k not in shapes]
            if absent:
                raise CheckpointCorruptError(
                    f"index {Path(ck.index.path).name} places {absent[:5]} in this shard but it does not hold them",
                    path=ck.folder / name,
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
                report.mismatched.append(
                    Mismatch(
                        live_key,
                        describe_tensor(live.dtype, live.shape),
                        describe_tensor(dtype, shape),
                        file=name if ck.index is not None else "",
                    )
                )
                continue
            todo.append((file_key, live_key))
            loaded.add(live_key)
        per_file.append((name, todo))
    mismatched = {m.key for m in report.mismatched}
    for key in dest:
        if key not in loaded and key not in mismatched and aliases.get(key) not in loaded:
            report.missing_keys.append(key)
    return per_file, report


def load_model_state(
    dest: dict[str, torch.Tensor],
    checkpoint: str | os.PathLike,
    *,
    strict: bool = True,
    aliases: dict[str, str] | None = None,
    num_threads: int = 1,
    verify: bool = False,
) -> LoadReport:
    """Load ``checkpoint`` into the live tensors ``dest`` (name -> tensor), in place.

    Everything is checked before anything is written; with ``strict=True`` any missing key,
    unexpected key or shape/dtype mismatch raises one :class:`StateMismatchError` that
    lists them all and leaves ``dest`` untouched.
    """
    if is_url(checkpoint):  # object store: download the committed version, load the local copy
        return on_local_path(
            checkpoint,
            lambda p: load_model_state(dest, p, strict=strict, aliases=aliases, num_threads=num_threads, verify=verify),
            save=False,
        )
    ck = locate_model(checkpoint)
    check_against_manifest(ck.folder, ck.files, checksums=verify)
    per_file, report = match_files_to_model(ck, dest, aliases or {}, _weights_file_shapes)
    if strict and not report.ok:
        raise StateMismatchError(
            f"checkpoint does not fit the model (strict=True): {report.describe()}", path=checkpoint, report=report
        )

    def copy_file(item: tuple[str, list[tuple[str, str]]]) -> None:
        name, todo = item
        if not todo:
            return
        weights = WeightsFile(ck.folder / name)
        try:
            with torch.no_grad():
                for file_key, live_key in weights.in_file_order(todo):
                    weights.copy_into(file_key, dest[live_key])
        except CheckpointError:
            raise
        except (OSError, RuntimeError) as exc:
            raise CheckpointCorruptError(f"reading tensors failed: {exc}", path=ck.folder / name) from exc
        finally:
            weights.close()

    if num_threads > 1 and len(per_file) > 1:
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            list(pool.map(copy_file, per_file))
    else:
        for item in per_file:
            copy_file(item)
    return report
