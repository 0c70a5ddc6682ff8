"""A Lightning checkpoint as a ckptio folder, and the plugin's body (no Lightning import here).

Lightning hands its ``CheckpointIO`` one dict per save: ``state_dict`` (the LightningModule's
weights), ``optimizer_states`` and ``lr_schedulers`` (their ``state_dict()``, optimizer state
keyed by parameter id), ``loops``, ``callbacks``, ``hyper_parameters``, ``epoch``,
``global_step``, ... :func:`save_lightning_checkpoint` writes it at Lightning's path (``last.ckpt``
included) as one folder, committed atomically with a manifest like every ckptio save::

    <path>/
        model-00001-of-0000N.safetensors, model.safetensors.index.json   the tensors of state_dict:
                                        a model folder that ckptio (and safetensors) read as it is
        state-00001-of-0000N.safetensors, state.safetensors.index.json   every other tensor with a
                                        dimension (optimizer moments, ...), keyed by its place in the dict
        lightning_checkpoint.json       all the rest as tagged JSON (tuples, dicts keyed by ids, 0-dim
                                        tensors exactly), each tensor above a reference to its file
        ckptio_manifest.json

No pickle is written or read, so a load is ``weights_only=True`` whatever Lightning asks: a
value with no exact JSON form (an object among the hyper-parameters) raises
:class:`~ckptio.errors.CheckpointFormatError` naming it before anything is written. With
``use_async=True`` a save copies the tensors into reused host buffers and returns; a background
thread writes and commits (one save in flight: the next save, a load, a removal or Lightning's
``teardown`` waits for it, and raises its error).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ckptio.checkpoint_io.general import GeneralCheckpointIO
from ckptio.engine.save import FilesPart, Part, TensorPart
from ckptio.engine.write import WriteSpec
from ckptio.errors import CheckpointCorruptError, CheckpointFormatError, CheckpointNotFoundError
from ckptio.formats import dtypes, naming, tagged_json
from ckptio.formats.hf_index import index_json, read_json_file
from ckptio.formats.versioned import check_versioned
from ckptio.layouts.model import MiB, ModelSaveOptions, model_metadata
from ckptio.state.stateful import tensor_key
from ckptio.state_dict import load_state_dict
from ckptio.storage import atomic
from ckptio.storage.location import is_url, normalize, readable
from ckptio.storage.manifest import read_manifest
from ckptio.storage.verify import check_against_manifest

FORMAT = "ckptio-lightning"
FORMAT_VERSION = 1
_MODEL, _STATE = "model", "state"


def checkpoint_parts(checkpoint: dict[str, Any], io: GeneralCheckpointIO, max_shard_bytes: int) -> list[Part]:
    """The parts of one save: the weights, the other tensors, the JSON. The JSON is rendered now,
    so a value that cannot be saved raises here, before anything is written."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"a Lightning checkpoint is a dict, got {type(checkpoint).__name__}")
    weights: dict[str, torch.Tensor] = {}
    others: dict[str, torch.Tensor] = {}

    def to_file(tensor: torch.Tensor, position: tuple, where: str) -> Any:
        if len(position) == 2 and position[0] == "state_dict" and isinstance(position[1], str):
            file, key, into = _MODEL, position[1], weights
        elif tensor.dim() == 0 and tagged_json.has_exact_form(tensor):
            return {tagged_json.TENSOR_TAG: tagged_json.encode_tensor(tensor.detach().cpu(), where)}
        else:
            file, key, into = _STATE, tensor_key(position), others
            while key in into:  # the int 0 and the string "0" in one dict: both stay, under different keys
                key += "'"
        into[key] = tensor.detach()
        body = {"file": file, "key": key, "dtype": dtypes.to_name(tensor.dtype), "shape": list(tensor.shape)}
        return {tagged_json.REF_TAG: body}

    try:
        body = tagged_json.encode(checkpoint, "checkpoint", to_file, any_keys=True)
    except tagged_json.NotJSONable as exc:
        raise CheckpointFormatError(
            f"{exc}: ckptio saves tensors, numbers, strings, None, lists, tuples and dicts (keyed by those), "
            "and never pickles; nothing was saved. Keep hyper-parameters and callback state to such values"
        ) from exc
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "checkpoint": body}
    opts = ModelSaveOptions(shard=True, use_safetensors=True, max_shard_bytes=max_shard_bytes)
    parts: list[Part] = [
        TensorPart(weights, opts.write_spec(), io.group, metadata=model_metadata(opts, {}), slot=_MODEL,
                   master_only=True),
    ]  # fmt: skip
    if others:
        spec = WriteSpec(naming.LIGHTNING_STATE_WEIGHTS, max_shard_bytes, shard=True, use_safetensors=True)
        metadata = lambda plan: {naming.LIGHTNING_STATE_INDEX: index_json(plan.weight_map or {}, plan.total_size)}  # noqa: E731
        parts.append(TensorPart(others, spec, io.group, metadata=metadata, slot=_STATE, master_only=True))
    text = json.dumps(document, indent=1, allow_nan=True) + "\n"
    parts.append(FilesPart({naming.LIGHTNING_DOCUMENT: text.encode("utf-8")}, master_only=True))
    return parts


def save_lightning_checkpoint(
    checkpoint: dict[str, Any],
    path: str | os.PathLike,
    *,
    io: GeneralCheckpointIO | None = None,
    use_async: bool = False,
    max_shard_bytes: int = 1024 * MiB,
) -> None:
    """Save Lightning's checkpoint dict as a folder at ``path`` (local or a URL), replacing what is
    there atomically. ``io`` carries the async save in flight and the staging buffers between saves."""
    io = io or GeneralCheckpointIO()
    io.wait()
    target = normalize(path)
    parts = checkpoint_parts(checkpoint, io, max_shard_bytes)
    what = f"Lightning checkpoint {target}"
    if is_url(target) or not Path(target).is_file():
        io.save_parts(target, parts, folder=True, use_async=use_async, what=what)
        return
    # a file that Lightning's torch.save wrote (the run switched plugins): the folder is committed under
    # a hidden name and then swapped with the file, so the path always holds one of the two
    token = atomic.new_token()
    staged = atomic.staging_path(Path(os.path.abspath(target)), token)
    io.save_parts(str(staged), parts, folder=True, use_async=False, what=what)
    atomic.swap_into_place(staged, Path(os.path.abspath(target)), token)


def is_lightning_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / naming.LIGHTNING_DOCUMENT).is_file()


def load_lightning_checkpoint(
    path: str | os.PathLike, *, map_location: Any = None, verify: bool = False
) -> dict[str, Any]:
    """The checkpoint dict saved at ``path``; tensors on the CPU unless ``map_location`` says
    otherwise (a device, ``{"cpu": device}``, or torch's ``fn(storage, "cpu")``). Every file is
    checked against the manifest first (sizes; checksums too with ``verify``)."""
    with readable(path) as local:
        folder = Path(local)
        if not is_lightning_folder(folder):
            raise CheckpointNotFoundError(
                f"not a ckptio Lightning checkpoint: {naming.LIGHTNING_DOCUMENT} is missing", path=folder
            )
        manifest = read_manifest(folder)
        if manifest is None:
            raise CheckpointCorruptError(f"{naming.MANIFEST} is missing: the save never committed", path=folder)
        check_against_manifest(folder, list(manifest.files), checksums=verify)
        document_path = folder / naming.LIGHTNING_DOCUMENT
        document = read_json_file(document_path, what="Lightning checkpoint")
        check_versioned(
            document, format=FORMAT, max_version=FORMAT_VERSION, what="Lightning checkpoint", path=document_path
        )
        refs: list[dict[str, Any]] = []

        def on_ref(body: Any) -> Any:
            ok = isinstance(body, dict) and body.get("file") in (_MODEL, _STATE) and isinstance(body.get("key"), str)
            if not ok or not isinstance(body.get("shape"), list):
                raise CheckpointFormatError(f"malformed tensor reference {body!r}", path=document_path)
            refs.append(body)
            return _Ref(len(refs) - 1)

        try:
            tree = tagged_json.decode(document.get("checkpoint"), on_ref)
        except ValueError as exc:
            if isinstance(exc, CheckpointFormatError):
                raise
            raise CheckpointFormatError(f"malformed checkpoint: {exc}", path=document_path) from exc
        tensors = {
            _MODEL: load_state_dict(folder) if any(r["file"] == _MODEL for r in refs) else {},
            _STATE: load_state_dict(folder / naming.LIGHTNING_STATE_INDEX) if any(r["file"] == _STATE for r in refs)
            else {},
        }  # fmt: skip
        resolved = [_resolve(r, tensors, folder, map_location) for r in refs]
    return _replace_refs(tree, resolved)


class _Ref(int):
    """A reference's index, told apart from the ints of the checkpoint by its type."""


def _resolve(ref: dict[str, Any], tensors: dict[str, dict], folder: Path, map_location: Any) -> torch.Tensor:
    tensor = tensors[ref["file"]].get(ref["key"])
    if tensor is None or dtypes.to_name(tensor.dtype) != ref.get("dtype") or list(tensor.shape) != ref["shape"]:
        raise CheckpointCorruptError(
            f"tensor {ref['key']!r} is missing from the {ref['file']} files or differs from its reference "
            f"({ref.get('dtype')}{ref['shape']})",
            path=folder,
        )
    return _place(tensor, map_location)


def _place(tensor: torch.Tensor, map_location: Any) -> torch.Tensor:
    if map_location is None:
        return tensor
    if isinstance(map_location, dict):
        map_location = map_location.get("cpu", "cpu")
    if callable(map_location):
        moved = map_location(tensor.untyped_storage(), "cpu")
        if moved is None or moved is tensor.untyped_storage():
            return tensor
        return tensor.to(moved.device)
    return tensor.to(map_location)


def _replace_refs(value: Any, resolved: list[torch.Tensor]) -> Any:
    if type(value) is _Ref:
        return resolved[value]
    if isinstance(value, list):
        return [_replace_refs(v, resolved) for v in value]
    if isinstance(value, tuple):
        return tuple(_replace_refs(v, resolved) for v in value)
    if isinstance(value, dict):
        return {k: _replace_refs(v, resolved) for k, v in value.items()}
    return value


def remove_checkpoint_at(path: str | os.PathLike) -> None:
    """Delete a checkpoint Lightning no longer keeps: a folder of ours (renamed aside first, so a
    crash never leaves half of it under its name), or a file an earlier plugin wrote."""
    target = normalize(path)
    if is_url(target):
        import fsspec

        fs, root = fsspec.core.url_to_fs(target)
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    local = Path(target)
    if local.is_dir() and not local.is_symlink():
        atomic.delete_folder(local)
    elif local.exists() or local.is_symlink():
        local.unlink()


class LightningCheckpointIOBase:
    """The body of ``LightningCheckpointIO`` (:mod:`ckptio.integrations.lightning`), mixed into the
    ``CheckpointIO`` class of whichever Lightning package the Trainer comes from.

    ``use_async``: return from a save once its tensors are copied (Lightning's own
    ``AsyncCheckpointIO`` wrapper works too, as with any CheckpointIO). ``verify``: check every
    checksum on load. ``max_shard_bytes``: the size of each safetensors shard. Files that Lightning's
    ``torch.save`` wrote (an older ``last.ckpt``) still load, through Lightning's own loader.
    """

    #: Lightning's ``TorchCheckpointIO`` of the same package: the loader of plain ``.ckpt`` files
    _torch_checkpoint_io: Callable[[], Any] | None = None

    def __init__(self, *, use_async: bool = False, verify: bool = False, max_shard_bytes: int = 1024 * MiB) -> None:
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
        super().__init__()
        self.use_async, self.verify, self.max_shard_bytes = bool(use_async), bool(verify), max_shard_bytes
        self._io = GeneralCheckpointIO()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options (got {storage_options!r}); "
                "pass use_async / max_shard_bytes to the plugin"
            )
        save_lightning_checkpoint(
            checkpoint, path, io=self._io, use_async=self.use_async, max_shard_bytes=self.max_shard_bytes
        )

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        self._io.wait()  # a save in flight may be the one asked for
        target = normalize(path)
        if not is_url(target) and Path(target).is_file() and self._torch_checkpoint_io is not None:
            return self._torch_checkpoint_io().load_checkpoint(target, map_location=map_location,
                                                               weights_only=weights_only)  # fmt: skip
        return load_lightning_checkpoint(target, map_location=map_location, verify=self.verify)

    def remove_checkpoint(self, path: Any) -> None:
        self._io.wait()
        remove_checkpoint_at(path)

    def teardown(self) -> None:
        """Lightning's end of a fit: the async save in flight is durable (or its error raised here)."""
        self._io.wait()
