"""Plain ``{name: tensor}`` dicts to checkpoints and back, without a model or a Booster.

The same engine, commit and formats as ``Booster.save_model`` / ``load_model``, for code that
holds tensors rather than modules (a converted state, an EMA copy, a subset of a model), and
for reading a few tensors of a large checkpoint without building its model.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable

import torch

from ckptio.checkpoint_io.base import _check_size_per_shard
from ckptio.engine.group import Group
from ckptio.engine.load import load_state
from ckptio.engine.reader import TensorFile
from ckptio.engine.save import TensorPart, save_parts
from ckptio.errors import CheckpointCorruptError, StateMismatchError
from ckptio.formats.naming import check_prefix
from ckptio.layouts.detect import Located, detect
from ckptio.layouts.model import ModelSaveOptions, model_metadata, model_owned_files
from ckptio.state.report import KeyMap, LoadReport
from ckptio.storage.location import normalize, readable, readable_partially
from ckptio.storage.verify import check_against_manifest


def save_state_dict(
    state: dict[str, torch.Tensor],
    checkpoint: str | os.PathLike,
    *,
    shard: bool = False,
    size_per_shard: float = 1024,
    use_safetensors: bool = True,
    prefix: str | None = None,
) -> None:
    """Save ``state`` to ``checkpoint`` (one file, or a Hugging Face folder of shards of at most
    ``size_per_shard`` MiB with ``shard=True``), atomically, from this process alone.

    Every key is written under its own name, also keys whose tensors share memory (pass one
    name of a tied pair to store it once). Tensors on the ``meta`` device are refused.

    Args:
        state: ``{name: tensor}`` (CPU or GPU, any dtype safetensors has).
        checkpoint: the file or folder, local or an fsspec URL.
        shard: a folder of shards and an index instead of one file.
        size_per_shard: the largest shard, in MiB.
        use_safetensors: safetensors files (``torch.save`` ones when False).
        prefix: goes into file names, as in ``Booster.save_model``.
    """
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"state must map names (str) to tensors; got {key!r}: {type(value).__name__}")
    opts = ModelSaveOptions(bool(shard), check_prefix(prefix), _check_size_per_shard(size_per_shard),
                            bool(use_safetensors))  # fmt: skip
    path = normalize(checkpoint)
    group = Group.of_one()
    metadata = model_metadata(opts, {}) if shard else None
    part = TensorPart(dict(state), opts.write_spec(path), group, metadata=metadata)
    save_parts(path, [part], group, folder=bool(shard), owns=model_owned_files(opts.prefix))


def load_into(
    dest: dict[str, torch.Tensor],
    checkpoint: str | os.PathLike,
    *,
    strict: bool = True,
    verify: bool = False,
    key_map: KeyMap | None = None,
    allow_dtype_cast: bool = True,
) -> LoadReport:
    """Copy a checkpoint's tensors into the existing tensors ``dest`` (by name), in place, with
    the options and report of :meth:`ckptio.CheckpointIO.load_model`.

    Args:
        dest: ``{name: tensor}`` to fill; shapes must match the checkpoint's (dtypes are cast
            unless ``allow_dtype_cast=False``; ``meta`` tensors are replaced by loaded CPU ones).
        checkpoint: any model checkpoint layout, local or an fsspec URL.
        strict: a missing, unexpected or mismatched key raises before anything is copied.
        verify: check every file's checksum against the manifest first.
        key_map: checkpoint key -> key of ``dest`` (a dict, or a function; None drops a key).
        allow_dtype_cast: cast tensors stored in another dtype (False: a mismatch).

    Returns:
        The :class:`LoadReport` of what did not fit (empty when everything did).
    """
    with readable(checkpoint, ranged=True) as local:
        return load_state(dest, local, Group.of_one(), strict=strict, verify=verify, key_map=key_map,
                          allow_dtype_cast=allow_dtype_cast)  # fmt: skip


def _files_to_read(located: Located, wanted: list[str] | None, checkpoint) -> dict[str, list[str] | None]:
    """``{file: keys to read (None: all)}``, from the index alone when there is one."""
    index = located.index
    if index is None:
        return {name: wanted for name in located.weight_files}
    if wanted is None:
        return dict.fromkeys(located.weight_files)
    files: dict[str, list[str]] = {}
    missing = []
    for key in wanted:
        name = index.weight_map.get(key)
        if name is None:
            missing.append(key)
        else:
            files.setdefault(name, []).append(key)
    if missing:
        _raise_missing(missing, list(index.weight_map), checkpoint)
    return files


def _raise_missing(missing: list[str], held: list[str], checkpoint) -> None:
    hints = []
    for key in missing[:3]:
        close = difflib.get_close_matches(key, held, n=1)
        if close:
            hints.append(f"{key!r} -> {close[0]!r}?")
    hint = f" (closest: {', '.join(hints)})" if hints else ""
    raise StateMismatchError(
        f"{len(missing)} keys not in this checkpoint: {missing[:10]}{hint}; it holds {len(held)} tensors",
        path=checkpoint,
    )


def load_state_dict(
    checkpoint: str | os.PathLike, keys: Iterable[str] | None = None, *, verify: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a model checkpoint, without its model: all of them, or only ``keys``.

    Reads any model checkpoint ckptio loads: one safetensors or ``torch.save`` file, a Hugging
    Face or ColossalAI folder (for a folder holding several prefixed saves, pass the index file,
    e.g. ``pytorch_model.bin.index.ema.json``), a training checkpoint (its ``modeling/``), or a
    URL. Only the files holding ``keys`` are opened (found through the index) and only those
    tensors' bytes are read; of a URL, only those files are downloaded. Keys are returned as the
    files name them (a ``module.`` prefix included), in the order of ``keys`` (else of the files),
    as new CPU tensors that share no memory with each other or the files. A key the checkpoint
    lacks raises :class:`~ckptio.StateMismatchError` naming it. ``verify=True`` checks the
    checksums of the files read against the manifest.

    Args:
        checkpoint: any model checkpoint layout, local or an fsspec URL.
        keys: the names to read (a name the checkpoint lacks raises); None reads every tensor.
        verify: check the checksums of the files read against the manifest first.

    Returns:
        ``{name: tensor}``, in the order of ``keys`` when given.
    """
    if isinstance(keys, str):
        raise TypeError(f"keys must be an iterable of tensor names, not the string {keys!r} (pass [{keys!r}])")
    wanted = None if keys is None else list(dict.fromkeys(keys))
    with readable_partially(checkpoint) as (local, fetch):
        located = detect(local, "model")
        files = _files_to_read(located, wanted, checkpoint)
        fetch([located.folder / name for name in files])
        check_against_manifest(located.folder, list(files), checksums=verify)
        out: dict[str, torch.Tensor] = {}
        for name, take in files.items():
            with TensorFile(located.folder / name) as tf:
                held = tf.shapes()
                if take is None:
                    take = list(held)
                absent = [k for k in take if k not in held]
                if absent and located.index is not None:
                    raise CheckpointCorruptError(
                        f"the index places {absent[:5]} in this shard but it does not hold them",
                        path=located.folder / name,
                    )
                if absent:
                    _raise_missing(absent, list(held), checkpoint)
                for key in tf.in_file_order(take):
                    tensor = tf.read(key)
                    # a torch file's tensors are views of its memory map: copy out only what was asked for
                    out[key] = tensor.clone() if tf.format == "torch" else tensor
        return out if wanted is None else {k: out[k] for k in wanted}
