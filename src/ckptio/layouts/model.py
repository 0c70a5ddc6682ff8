"""The model checkpoint layout: which files a save writes and what the master adds.

A model checkpoint is one weights file (safetensors or ``torch.save``), or a folder in the
Hugging Face layout: size-bounded shards ``model-0000k-of-0000n.safetensors`` (or
``pytorch_model-...bin``; a ColossalAI ``prefix`` goes before the extension), the index
``model.safetensors.index.json`` and, for a ``transformers`` model, ``config.json`` and
``generation_config.json``. The shards and the index depend only on the tensors and the
options (:mod:`ckptio.engine.plan`), never on how many ranks wrote them. Modules' extra state
that is not a tensor goes in the index's metadata, or in the one file
(:mod:`ckptio.formats.extra_state`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ckptio.engine.plan import FilePlan
from ckptio.engine.write import WriteSpec
from ckptio.formats import extra_state as extra_state_format
from ckptio.formats import frozen as frozen_format
from ckptio.formats import naming
from ckptio.formats.hf_index import index_json

MiB = 1024 * 1024
SAFETENSORS_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class ModelSaveOptions:
    shard: bool = False
    prefix: str | None = None
    max_shard_bytes: int = 1024 * MiB
    use_safetensors: bool = False
    #: write only the parameters that train; the frozen ones are named in the index or the file
    #: (:mod:`ckptio.formats.frozen`) and come back from the base weights at load time
    only_trainable: bool = False

    @property
    def weights_name(self) -> str:
        return naming.weights_name(self.use_safetensors, self.prefix)

    @property
    def index_name(self) -> str:
        return naming.index_name(self.use_safetensors, self.prefix)

    def write_spec(
        self,
        checkpoint: str | os.PathLike | None = None,
        extra_state: dict[str, Any] | None = None,
        frozen: list[str] | None = None,
    ) -> WriteSpec:
        """How the engine writes the weights; a one-file save takes its format from the path's suffix
        and holds ``extra_state`` (encoded by :func:`ckptio.formats.extra_state.encode`) and, when
        ``only_trainable``, the ``frozen`` keys it leaves out itself."""
        use_safetensors = self.use_safetensors
        if not self.shard and checkpoint is not None:
            use_safetensors = single_file_is_safetensors(checkpoint, self)
        text = extra_state_format.to_text(extra_state) if extra_state and not self.shard else None
        metadata: tuple[tuple[str, str], ...] = ()
        if self.only_trainable and not self.shard:
            if not use_safetensors:
                raise ValueError(
                    f"only_trainable=True with a one-file torch save ({os.fspath(checkpoint or self.weights_name)}): "
                    "a torch file has no room to record the frozen parameters it leaves out, so a strict load "
                    "could not tell them from missing ones; save to a .safetensors path or with shard=True"
                )
            metadata = ((frozen_format.METADATA_KEY, frozen_format.to_text(frozen or [])),)
        return WriteSpec(
            self.weights_name, self.max_shard_bytes, self.shard, use_safetensors, extra_state=text,
            file_metadata=metadata,
        )  # fmt: skip


def single_file_is_safetensors(checkpoint: str | os.PathLike, opts: ModelSaveOptions) -> bool:
    suffix = os.path.splitext(os.fspath(checkpoint))[1].lower()
    if suffix == ".safetensors":
        return True
    if suffix in (".bin", ".pt", ".pth"):
        return False
    return opts.use_safetensors


def model_metadata(
    opts: ModelSaveOptions,
    extra_files: dict[str, bytes] | None,
    extra_state: dict[str, Any] | None = None,
    frozen: list[str] | None = None,
) -> Callable[[FilePlan], dict]:
    """What the master writes after the shards: the index (sharded saves; with the encoded
    ``extra_state`` and, for ``only_trainable``, the ``frozen`` keys left out) and
    ``extra_files`` (``config.json`` ...), as ``{name: bytes}`` for a plan."""

    def files(plan: FilePlan) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        if plan.weight_map is not None:  # like ColossalAI, a sharded save always has an index
            metadata: dict[str, Any] = {"format": "ckptio", "format_version": 1}
            if extra_state:
                metadata[extra_state_format.INDEX_KEY] = extra_state
            if opts.only_trainable:
                metadata.update(frozen_format.index_entries(frozen or []))
            out[opts.index_name] = index_json(plan.weight_map, plan.total_size, metadata)
        out.update(extra_files or {})
        return out

    return files


def model_owned_files(prefix: str | None, extra_files=()) -> Callable[[str], bool]:
    """The entries of an existing folder that a sharded model save replaces: every weights file
    and index of its prefix (old shards of either format), and the extra files it writes.
    Anything else (another prefix's shards, an optimizer, the user's files) is kept."""
    pattern = naming.model_files_pattern(prefix)
    extras = set(extra_files)
    return lambda name: bool(pattern.match(name)) or name in extras
