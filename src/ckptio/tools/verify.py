"""What ``ckptio verify`` checks, for every kind of checkpoint, as plain functions.

Each check returns two lists of sentences: what passed and what is wrong (the file named
first). Nothing here prints or exits; the command line does that. A training checkpoint
(``epoch-E_step-S/``) is checked as a whole: its manifest covers every file in every
subfolder, then each part is parsed the way loading would parse it. A folder of training
checkpoints (what ``CheckpointManager`` writes) is checked one checkpoint after another.
"""

from __future__ import annotations

from pathlib import Path

from ckptio.engine.reader import TensorFile
from ckptio.errors import CheckpointError
from ckptio.formats import safetensors_format
from ckptio.formats.hf_index import read_json_file
from ckptio.formats.naming import (
    DELETE_MARK,
    RNG_DIR,
    RUNNING_STATES,
    TMP_MARK,
    TRAINING_LR_SCHEDULER,
    TRAINING_MODEL_DIR,
    TRAINING_OPTIMIZER_DIR,
)
from ckptio.layouts.detect import Located, detect, training_checkpoints_in
from ckptio.layouts.lr_scheduler import read_lr_scheduler_state
from ckptio.layouts.optimizer import read_saved
from ckptio.storage.location import committed_local
from ckptio.storage.manifest import read_manifest
from ckptio.storage.verify import file_checksum

Report = tuple[list[str], list[str]]


def verify_manifest(folder: Path, checksums: bool, ok: list[str], problems: list[str]) -> None:
    try:
        manifest = read_manifest(folder)
    except CheckpointError as exc:
        manifest = None
        problems.append(str(exc))
    if manifest is not None:
        for name, record in sorted(manifest.files.items()):
            path = folder / name
            if not path.is_file():
                problems.append(f"{name}: listed in the manifest but missing")
                continue
            size = path.stat().st_size
            if size != record.size:
                problems.append(f"{name}: size {size} bytes, manifest says {record.size} (truncated or replaced)")
            elif checksums and file_checksum(path) != record.checksum:
                problems.append(f"{name}: xxh3-128 checksum differs from the manifest (bytes are corrupt)")
            else:
                ok.append(f"{name}: size{' and checksum' if checksums else ''} match the manifest")
    else:
        ok.append("no ckptio manifest (written by another tool): checking headers and index only")


def verify_optimizer(located: Located, checksums: bool, *, manifest: bool = True) -> Report:
    ok: list[str] = []
    problems: list[str] = []
    if manifest:
        verify_manifest(located.folder, checksums, ok, problems)
    try:
        # parses the index and groups (ColossalAI's and torch files: every tensor); sizes checked, checksums above
        _, weight_map = read_saved(located, verify=False)
    except CheckpointError as exc:
        problems.append(str(exc))
        return ok, problems
    if weight_map is None:
        ok.append(f"{located.entry}: {located.layout} layout readable, every entry present")
        return ok, problems
    by_file: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        by_file.setdefault(name, []).append(key)
    for name, keys in by_file.items():
        try:
            with safetensors_format.SafetensorsReader.open(located.folder / name) as st:
                absent = [k for k in keys if k not in st.tensors]
        except CheckpointError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if absent:
            problems.append(f"{name}: {len(absent)} index entries not in this shard, e.g. {absent[:3]}")
        else:
            ok.append(f"{name}: header readable, all {len(keys)} index entries present")
    return ok, problems


def verify_model(located: Located, checksums: bool, *, manifest: bool = True) -> Report:
    ok: list[str] = []
    problems: list[str] = []
    if manifest:
        verify_manifest(located.folder, checksums, ok, problems)
    held: dict[str, set[str]] = {}
    for name in located.weight_files:
        file = located.folder / name
        if not file.is_file():
            problems.append(f"{name}: named by the index but missing")
            continue
        try:
            with TensorFile(file) as tf:
                held[name] = set(tf.shapes())
            ok.append(f"{name}: header readable, {len(held[name])} tensors")
        except CheckpointError as exc:
            problems.append(f"{name}: {exc}")
    index = located.index
    if index is not None:
        index_name = Path(index.path).name
        missing = [k for k, f in index.weight_map.items() if f in held and k not in held[f]]
        if missing:
            problems.append(f"{index_name}: {len(missing)} index entries not in their shard, e.g. {missing[:3]}")
        listed = set(index.weight_map)
        extra = sorted(k for keys in held.values() for k in keys if k not in listed)
        if extra:
            problems.append(f"{index_name}: {len(extra)} tensors in shards but not in the index, e.g. {extra[:3]}")
        if not missing and not extra:
            ok.append(f"{index_name}: all {len(listed)} entries present in their shards")
    return ok, problems


def verify_lr_scheduler(located: Located, checksums: bool) -> Report:
    try:
        read_lr_scheduler_state(located.entry_path)
    except CheckpointError as exc:
        return [], [str(exc)]
    return [f"{located.entry}: LR scheduler state readable ({located.layout})"], []


def _prefixed(prefix: str, report: Report, ok: list[str], problems: list[str]) -> None:
    ok.extend(f"{prefix}/{line}" for line in report[0])
    problems.extend(f"{prefix}/{line}" for line in report[1])


def verify_training_checkpoint(folder: Path, checksums: bool) -> Report:
    """One ``epoch-E_step-S`` folder: its manifest (every file, every subfolder), then each part parsed."""
    ok: list[str] = []
    problems: list[str] = []
    verify_manifest(folder, checksums, ok, problems)
    try:
        running = read_json_file(folder / RUNNING_STATES, what=RUNNING_STATES)
        fields = (
            {k: running.get(k) for k in ("epoch", "step", "sample_start_index")} if isinstance(running, dict) else {}
        )
        bad = [k for k, v in fields.items() if isinstance(v, bool) or not isinstance(v, int)] if fields else ["all"]
        if bad:
            problems.append(f"{RUNNING_STATES}: {', '.join(bad)} missing or not an integer")
        else:
            ok.append(f"{RUNNING_STATES}: epoch {fields['epoch']}, step {fields['step']}")
    except CheckpointError as exc:
        problems.append(str(exc))
    model_dir, optimizer_dir = folder / TRAINING_MODEL_DIR, folder / TRAINING_OPTIMIZER_DIR
    if model_dir.is_dir():
        try:
            report = verify_model(detect(model_dir, "model"), checksums, manifest=False)
        except CheckpointError as exc:
            report = ([], [str(exc)])
        _prefixed(TRAINING_MODEL_DIR, report, ok, problems)
    else:
        problems.append(f"{TRAINING_MODEL_DIR}/: missing (every training checkpoint has the model)")
    if optimizer_dir.is_dir():
        try:
            report = verify_optimizer(detect(optimizer_dir, "optimizer"), checksums, manifest=False)
        except CheckpointError:
            report = ([], ["no optimizer index in this folder"])
        _prefixed(TRAINING_OPTIMIZER_DIR, report, ok, problems)
    if (folder / TRAINING_LR_SCHEDULER).is_file():
        try:
            read_lr_scheduler_state(folder / TRAINING_LR_SCHEDULER)
            ok.append(f"{TRAINING_LR_SCHEDULER}: readable")
        except CheckpointError as exc:
            problems.append(str(exc))
    for rng_file in sorted((folder / RNG_DIR).glob("*.json")) if (folder / RNG_DIR).is_dir() else []:
        try:
            read_json_file(rng_file, what="RNG state")
            ok.append(f"{RNG_DIR}/{rng_file.name}: readable")
        except CheckpointError as exc:
            problems.append(str(exc))
    return ok, problems


def verify_save_dir(folder: Path, checksums: bool) -> Report:
    """Every checkpoint of a run's folder; leftovers of crashed saves are reported, not failed."""
    ok: list[str] = []
    problems: list[str] = []
    for checkpoint in training_checkpoints_in(folder):
        try:
            committed = Path(committed_local(checkpoint))  # a synced copy of an s3:// run too
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        _prefixed(checkpoint.name, verify_training_checkpoint(committed, checksums), ok, problems)
    leftovers = sorted(p.name for p in folder.iterdir() if TMP_MARK in p.name)
    if leftovers:
        ok.append(f"{len(leftovers)} unfinished save(s) left by a crash, ignored (the next save removes them)")
    deleting = sorted(p.name for p in folder.iterdir() if DELETE_MARK in p.name)
    if deleting:
        ok.append(f"{len(deleting)} checkpoint deletion(s) cut short by a crash, ignored (the next save removes them)")
    return ok, problems


def verify_path(local: str | Path, checksums: bool = True) -> Report:
    """(passed checks, problems) for whatever ``local`` holds: a model, an optimizer, an LR
    scheduler file, a training checkpoint, or a folder of training checkpoints. Raises
    :class:`~ckptio.errors.CheckpointNotFoundError` when it holds no checkpoint at all."""
    located = detect(local)
    if located.kind == "training":
        return verify_training_checkpoint(located.folder, checksums)
    if located.kind == "runs":
        return verify_save_dir(located.folder, checksums)
    if located.kind == "optimizer":
        return verify_optimizer(located, checksums)
    if located.kind == "lr_scheduler":
        return verify_lr_scheduler(located, checksums)
    return verify_model(located, checksums)
