"""What ``ckptio verify`` checks, for every kind of checkpoint, as plain functions.

Each check returns two lists of sentences: what passed and what is wrong (the file named
first). Nothing here prints or exits; the command line does that. A training checkpoint
(``epoch-E_step-S/``) is checked as a whole: its manifest covers every file in every
subfolder, then each part is parsed the way loading would parse it. A folder of training
checkpoints (what ``CheckpointManager`` writes) is checked one checkpoint after another.
"""

from __future__ import annotations

from pathlib import Path

from ckptio.checkpoint_io.model_files import WeightsFile, locate_model
from ckptio.errors import CheckpointError
from ckptio.formats import safetensors_format
from ckptio.formats.naming import DELETE_MARK, TMP_MARK
from ckptio.storage.manifest import read_manifest
from ckptio.storage.verify import file_checksum
from ckptio.training.checkpoint import (
    LR_SCHEDULER_FILE,
    MODEL_DIR,
    OPTIMIZER_DIR,
    RUNNING_STATES,
    parse_checkpoint_name,
)
from ckptio.training.rng import FOLDER as RNG_DIR

Report = tuple[list[str], list[str]]


def locate_sharded_optimizer(path: str | Path):
    """The located optimizer checkpoint when ``path`` is a sharded one (ckptio or ColossalAI layout), else None.

    A single ``.bin`` is read as model weights; ``ckptio verify``/``inspect`` of a single
    optimizer file therefore reports it as a model file that is not a flat tensor dict.
    """
    from ckptio.checkpoint_io.optimizer_files import locate_optimizer

    try:
        located = locate_optimizer(str(path))
    except CheckpointError:
        return None
    return located if located.layout != "torch" else None


def optimizer_files(located) -> list[str]:
    from ckptio.formats.hf_index import read_index

    index = read_index(located.path)
    files = [located.path.name, *index.shard_files]
    group_file = index.metadata.get("param_groups")
    if isinstance(group_file, str):
        files.append(group_file)
    return files


def is_training_checkpoint(path: str | Path) -> bool:
    return (Path(path) / RUNNING_STATES).is_file()


def training_checkpoints_in(path: str | Path) -> list[Path]:
    """The ``epoch-E_step-S`` folders directly inside ``path`` (a run's save_dir), by epoch then step."""
    folder = Path(path)
    if not folder.is_dir() or is_training_checkpoint(folder):
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and parse_checkpoint_name(p.name) is not None]
    return sorted(found, key=lambda p: parse_checkpoint_name(p.name))


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


def verify_optimizer(located, checksums: bool, *, manifest: bool = True) -> Report:
    from ckptio.checkpoint_io.optimizer_files import read_saved_optimizer

    ok: list[str] = []
    problems: list[str] = []
    if manifest:
        verify_manifest(located.path.parent, checksums, ok, problems)
    try:
        _, reader = read_saved_optimizer(located)  # parses index, groups and (ColossalAI) every shard
    except CheckpointError as exc:
        problems.append(str(exc))
        return ok, problems
    if reader is None:
        ok.append(f"{located.path.name}: {located.layout} layout readable, every index entry in its shard")
        return ok, problems
    try:
        by_file: dict[str, list[str]] = {}
        for key, name in reader.weight_map.items():
            by_file.setdefault(name, []).append(key)
        for name, keys in by_file.items():
            try:
                with safetensors_format.SafetensorsReader.open(located.path.parent / name) as st:
                    absent = [k for k in keys if k not in st.tensors]
            except CheckpointError as exc:
                problems.append(f"{name}: {exc}")
                continue
            if absent:
                problems.append(f"{name}: {len(absent)} index entries not in this shard, e.g. {absent[:3]}")
            else:
                ok.append(f"{name}: header readable, all {len(keys)} index entries present")
    finally:
        reader.close()
    return ok, problems


def verify_model(path: str | Path, checksums: bool, *, manifest: bool = True) -> Report:
    ok: list[str] = []
    problems: list[str] = []
    try:
        ck = locate_model(str(path))
    except CheckpointError as exc:
        return ok, [str(exc)]
    if manifest:
        verify_manifest(ck.folder, checksums, ok, problems)
    held: dict[str, set[str]] = {}
    for name in ck.files:
        file = ck.folder / name
        if not file.is_file():
            problems.append(f"{name}: named by the index but missing")
            continue
        try:
            weights = WeightsFile(file)
            try:
                held[name] = set(weights.shapes())
            finally:
                weights.close()
            ok.append(f"{name}: header readable, {len(held[name])} tensors")
        except CheckpointError as exc:
            problems.append(f"{name}: {exc}")
    if ck.index is not None:
        index_name = Path(ck.index.path).name
        missing = [k for k, f in ck.index.weight_map.items() if f in held and k not in held[f]]
        if missing:
            problems.append(f"{index_name}: {len(missing)} index entries not in their shard, e.g. {missing[:3]}")
        listed = set(ck.index.weight_map)
        extra = sorted(k for keys in held.values() for k in keys if k not in listed)
        if extra:
            problems.append(f"{index_name}: {len(extra)} tensors in shards but not in the index, e.g. {extra[:3]}")
        if not missing and not extra:
            ok.append(f"{index_name}: all {len(listed)} entries present in their shards")
    return ok, problems


def _prefixed(prefix: str, report: Report, ok: list[str], problems: list[str]) -> None:
    ok.extend(f"{prefix}/{line}" for line in report[0])
    problems.extend(f"{prefix}/{line}" for line in report[1])


def verify_training_checkpoint(folder: Path, checksums: bool) -> Report:
    """One ``epoch-E_step-S`` folder: its manifest (every file, every subfolder), then each part parsed."""
    from ckptio.checkpoint_io.lr_scheduler_files import read_lr_scheduler_state
    from ckptio.formats.hf_index import read_json_file

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
    if (folder / MODEL_DIR).is_dir():
        _prefixed(MODEL_DIR, verify_model(folder / MODEL_DIR, checksums, manifest=False), ok, problems)
    else:
        problems.append(f"{MODEL_DIR}/: missing (every training checkpoint has the model)")
    if (folder / OPTIMIZER_DIR).is_dir():
        located = locate_sharded_optimizer(folder / OPTIMIZER_DIR)
        if located is None:
            problems.append(f"{OPTIMIZER_DIR}/: no optimizer index in this folder")
        else:
            _prefixed(OPTIMIZER_DIR, verify_optimizer(located, checksums, manifest=False), ok, problems)
    if (folder / LR_SCHEDULER_FILE).is_file():
        try:
            read_lr_scheduler_state(folder / LR_SCHEDULER_FILE)
            ok.append(f"{LR_SCHEDULER_FILE}: readable")
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
        _prefixed(checkpoint.name, verify_training_checkpoint(checkpoint, checksums), ok, problems)
    leftovers = sorted(p.name for p in folder.iterdir() if TMP_MARK in p.name)
    if leftovers:
        ok.append(f"{len(leftovers)} unfinished save(s) left by a crash, ignored (the next save removes them)")
    deleting = sorted(p.name for p in folder.iterdir() if DELETE_MARK in p.name)
    if deleting:
        ok.append(f"{len(deleting)} checkpoint deletion(s) cut short by a crash, ignored (the next save removes them)")
    return ok, problems


def verify_path(local: str, checksums: bool) -> Report:
    """(passed checks, problems) for whatever ``local`` holds: a model, an optimizer, a training
    checkpoint, or a folder of training checkpoints."""
    if is_training_checkpoint(local):
        return verify_training_checkpoint(Path(local), checksums)
    if training_checkpoints_in(local):
        return verify_save_dir(Path(local), checksums)
    located = locate_sharded_optimizer(local)
    if located is not None:
        return verify_optimizer(located, checksums)
    return verify_model(local, checksums)
