"""Plain ``{name: tensor}`` dicts to checkpoints and back, without a model or a Booster.

The same engine, commit and formats as ``Booster.save_model`` / ``load_model``, for code that
holds tensors rather than modules (a converted state, an EMA copy, a subset of a model).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from ckptio.engine.group import Group
from ckptio.engine.load import load_state
from ckptio.engine.reader import TensorFile
from ckptio.engine.save import TensorPart, save_parts
from ckptio.errors import CheckpointError
from ckptio.layouts.detect import detect
from ckptio.layouts.model import MiB, ModelSaveOptions, model_metadata, model_owned_files
from ckptio.state.report import LoadReport
from ckptio.storage.location import normalize, readable
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
    """Save ``state`` to ``checkpoint`` (a file, or a Hugging Face folder with ``shard=True``),
    atomically, from this process alone. Tensors sharing memory are written once each.

    Args:
        state: ``{name: tensor}`` (CPU or GPU, any dtype safetensors has).
        checkpoint: the file or folder, local or an fsspec URL.
        shard: a folder of shards and an index instead of one file.
        size_per_shard: the largest shard, in MiB.
        use_safetensors: safetensors files (``torch.save`` ones when False).
        prefix: goes into file names, as in ``Booster.save_model``.
    """
    opts = ModelSaveOptions(shard, prefix, max(1, int(size_per_shard * MiB)), use_safetensors)
    path = normalize(checkpoint)
    group = Group.of_one()
    metadata = model_metadata(opts, {}) if shard else None
    part = TensorPart(dict(state), opts.write_spec(path), group, metadata=metadata)
    save_parts(path, [part], group, folder=shard, owns=model_owned_files(prefix))


def load_into(
    dest: dict[str, torch.Tensor], checkpoint: str | os.PathLike, *, strict: bool = True, verify: bool = False
) -> LoadReport:
    """Copy a checkpoint's tensors into the existing tensors ``dest`` (by name), in place.

    Args:
        dest: ``{name: tensor}`` to fill; shapes and dtypes must match the checkpoint's.
        checkpoint: any model checkpoint layout, local or an fsspec URL.
        strict: a missing, unexpected or mismatched key raises before anything is copied.
        verify: check every file's checksum against the manifest first.

    Returns:
        The :class:`LoadReport` of what did not fit (empty when everything did).
    """
    with readable(checkpoint) as local:
        return load_state(dest, local, Group.of_one(), strict=strict, verify=verify)


def load_state_dict(
    checkpoint: str | os.PathLike, keys: Iterable[str] | None = None, *, verify: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a model checkpoint in any layout we read (one file, a sharded folder, a
    training checkpoint's model), as new CPU tensors: all of them, or only ``keys``, reading
    only the files and bytes that hold them.

    Args:
        checkpoint: any model checkpoint layout, local or an fsspec URL.
        keys: the names to read (a name the checkpoint lacks raises); None reads every tensor.
        verify: check the checksums of the files read against the manifest first.

    Returns:
        ``{name: tensor}``, in the order of ``keys`` when given.
    """
    with readable(checkpoint) as local:
        located = detect(local, "model")
        wanted = None if keys is None else list(dict.fromkeys(keys))
        files: dict[str, list[str]] = {}
        found: set[str] = set()
        for name in located.weight_files:
            with TensorFile(located.folder / name) as tf:
                held = list(tf.shapes())
            take = held if wanted is None else [k for k in held if k in set(wanted)]
            if take:
                files[name] = take
                found.update(take)
        if wanted is not None and (missing := [k for k in wanted if k not in found]):
            raise CheckpointError(f"keys not in this checkpoint: {missing[:10]}", path=checkpoint)
        check_against_manifest(located.folder, list(files), checksums=verify)
        out: dict[str, torch.Tensor] = {}
        for name, take in files.items():
            with TensorFile(located.folder / name) as tf:
                for key in tf.in_file_order(take):
                    out[key] = tf.read(key)
        return out if wanted is None else {k: out[k] for k in wanted}
