"""What a checkpoint holds, as data: the ``ckptio inspect`` report, usable from Python.

Only headers, indexes and small JSON files are read, never tensor data (a ``.bin`` file is
memory-mapped). Every function takes a local path or a URL and returns plain dicts that
``json.dumps`` accepts.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from ckptio.errors import CheckpointError
from ckptio.formats.hf_index import read_json_file
from ckptio.formats.naming import RUNNING_STATES, TRAINING_MODEL_DIR, TRAINING_OPTIMIZER_DIR
from ckptio.layouts.detect import Located, detect, training_checkpoints_in
from ckptio.storage.location import committed_local, readable
from ckptio.storage.manifest import read_manifest
from ckptio.tools.view import ModelView


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def inspect_checkpoint(path: str | os.PathLike, *, tensors: bool = False) -> dict[str, Any]:
    """The report for whatever ``path`` holds; ``kind`` says which: ``model``, ``optimizer``,
    ``lr_scheduler``, ``training`` (one ``epoch-E_step-S`` folder) or ``training runs``.

    Args:
        path: local or an fsspec URL.
        tensors: also list every tensor (name, dtype, shape, file) of a model.

    Returns:
        A dict ``json.dumps`` accepts (what ``ckptio inspect --json`` prints).
    """
    label = os.fspath(path)
    with readable(path) as local:
        located = detect(local)
        if located.kind == "training":
            return training_summary(label, located.folder, tensors=tensors)
        if located.kind == "runs":
            return runs_summary(label, located.folder)
        if located.kind == "optimizer":
            return optimizer_summary(label, located)
        if located.kind == "lr_scheduler":
            return {"path": label, "kind": "lr_scheduler", "layout": located.layout,
                    "file_bytes": located.entry_path.stat().st_size}  # fmt: skip
        return model_summary(label, local, tensors=tensors)


def model_summary(label: str, local: str | os.PathLike, *, tensors: bool = False) -> dict[str, Any]:
    """Format, files, tensor count, parameters, bytes and dtypes of a model checkpoint."""
    with ModelView(local) as view:
        manifest = read_manifest(view.located.folder)
        files = []
        for name in view.files:
            entries = [e for e in view.tensors.values() if e.file == name]
            files.append(
                {
                    "name": name,
                    "bytes": view.file_size(name),
                    "tensors": len(entries),
                    "parameters": sum(e.numel for e in entries),
                    "dtypes": dict(Counter(dtype_name(e.dtype) for e in entries)),
                }
            )
        index = view.located.index
        summary: dict[str, Any] = {
            "path": label,
            "kind": "model",
            "format": view.format,
            "sharded": view.located.is_sharded,
            "index": Path(index.path).name if index is not None else None,
            "ckptio_manifest": manifest is not None,
            "tensor_count": len(view.tensors),
            "parameters": sum(e.numel for e in view.tensors.values()),
            "tensor_bytes": sum(e.nbytes for e in view.tensors.values()),
            "file_bytes": sum(f["bytes"] for f in files),
            "dtypes": dict(Counter(dtype_name(e.dtype) for e in view.tensors.values())),
            "files": files,
        }
        if tensors:
            summary["tensors"] = [
                {"name": e.key, "dtype": dtype_name(e.dtype), "shape": list(e.shape), "file": e.file}
                for e in view.tensors.values()
            ]
    return summary


def optimizer_summary(label: str, located: Located) -> dict[str, Any]:
    """Layout, index and files of an optimizer checkpoint (one torch file or a sharded folder)."""
    folder = located.folder
    present = [f for f in located.files if (folder / f).is_file()]
    entries = len(located.index.weight_map) if located.index is not None else None
    return {
        "path": label,
        "kind": "optimizer",
        "layout": located.layout,
        "index": located.entry,
        "ckptio_manifest": read_manifest(folder) is not None,
        "entries": entries,
        "file_bytes": sum((folder / f).stat().st_size for f in present),
        "files": [{"name": f, "bytes": (folder / f).stat().st_size} for f in present],
    }


def running_states(folder: str | os.PathLike) -> dict[str, Any]:
    data = read_json_file(Path(folder) / RUNNING_STATES, what=RUNNING_STATES)
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object", path=Path(folder) / RUNNING_STATES)
    return data


def training_summary(label: str, folder: str | os.PathLike, *, tensors: bool = False) -> dict[str, Any]:
    """A training checkpoint: where the run was, then its model and optimizer parts."""
    folder = Path(folder)
    model = model_summary(f"{label}/{TRAINING_MODEL_DIR}", folder / TRAINING_MODEL_DIR, tensors=tensors)
    optimizer = None
    if (folder / TRAINING_OPTIMIZER_DIR).is_dir():
        try:
            located = detect(folder / TRAINING_OPTIMIZER_DIR, "optimizer")
            optimizer = optimizer_summary(f"{label}/{TRAINING_OPTIMIZER_DIR}", located)
        except CheckpointError:
            optimizer = None
    covered = read_manifest(folder) is not None  # one manifest for the whole checkpoint, subfolders included
    for part in (model, optimizer):
        if part is not None:
            part["ckptio_manifest"] = covered
    return {
        "path": label,
        "kind": "training",
        "running_states": running_states(folder),
        "model": model,
        "optimizer": optimizer,
    }


def runs_summary(label: str, folder: str | os.PathLike) -> dict[str, Any]:
    """A run's folder of training checkpoints (what CheckpointManager keeps), oldest first."""
    rows = []
    for checkpoint in training_checkpoints_in(folder):
        files = [p for p in checkpoint.rglob("*") if p.is_file()]
        try:
            running = running_states(committed_local(checkpoint))  # a synced copy of an s3:// run too
            where = f"epoch {running.get('epoch')}, step {running.get('step')}"
        except CheckpointError:
            where = "incomplete (no readable running_states.json)"
        rows.append(
            {
                "name": checkpoint.name,
                "state": where,
                "files": len(files),
                "bytes": sum(p.stat().st_size for p in files),
            }
        )
    return {"path": label, "kind": "training runs", "checkpoints": rows}
