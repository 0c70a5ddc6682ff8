"""The optimizer checkpoint layouts: what a save writes, and reading a saved optimizer back.

* ``shard=False``: one ``torch.save`` file in the plain ``optimizer.state_dict()`` layout
  (positional ids), as ColossalAI and plain PyTorch write it; a path ending in
  ``.safetensors`` gets a safetensors file in ColossalAI's flat layout instead (what ColossalAI
  writes with ``use_async=True``, :mod:`ckptio.formats.colossal_optim`), so each loads the other's.
* ``shard=True``, layout ``"ckptio"`` (the default): state tensors by parameter name in
  size-bounded safetensors shards (``optimizer-00001-of-00002.safetensors``, key
  ``<param_name>/<state_name>``) and ``optimizer.index.json``: the usual ``metadata`` +
  ``weight_map``, plus ``optimizer``: groups with hyper-parameters and parameter names, full
  parameter shapes, scalar state such as ``step`` with its dtype
  (:mod:`ckptio.state.optimizer`). No pickle anywhere.
* ``shard=True``, layout ``"colossalai"``: ColossalAI's layout (:mod:`ckptio.formats.colossal_optim`).

Loading finds the layout itself (:func:`ckptio.layouts.detect.detect`); names are used when
both the file and the live optimizer have them, positions otherwise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ckptio.engine.plan import FilePlan
from ckptio.engine.split import split_greedy
from ckptio.engine.write import WriteSpec
from ckptio.formats import colossal_optim, naming, torch_format
from ckptio.formats.hf_index import read_json_file
from ckptio.layouts.detect import Located, torch_kind, wrong_kind
from ckptio.state import optimizer as ostate
from ckptio.storage.verify import check_against_manifest

LAYOUTS = ("ckptio", "colossalai")


@dataclass(frozen=True)
class OptimizerSaveOptions:
    shard: bool = False
    prefix: str | None = None
    max_shard_bytes: int = 1024 * 1024 * 1024
    layout: str = "ckptio"
    #: format of a one-file save (``shard=False``): "torch", or "safetensors" (ColossalAI's flat layout)
    single_file: str = "torch"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"optimizer layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.single_file not in ("torch", "safetensors"):
            raise ValueError(f"single_file must be 'torch' or 'safetensors', got {self.single_file!r}")

    def write_spec(self) -> WriteSpec:
        """The state tensors of ckptio's layout: safetensors shards, none when there is no state yet."""
        weights = naming.optimizer_weights_name(self.prefix)
        return WriteSpec(weights, self.max_shard_bytes, shard=True, use_safetensors=True, empty_file=False)


def owned_files(prefix: str | None):
    """Every optimizer file a sharded save with this prefix replaces, in either layout."""
    pattern = naming.optimizer_files_pattern(prefix)
    return lambda name: bool(pattern.match(name))


def index_bytes(plan: FilePlan, description: dict[str, Any]) -> bytes:
    """The index: Hugging Face's ``metadata`` + ``weight_map``, and the optimizer description."""
    body = {
        "metadata": {
            "total_size": plan.total_size,
            "format": ostate.FORMAT,
            "format_version": description.get("format_version", ostate.FORMAT_VERSION),
        },
        "weight_map": plan.weight_map or {},
        "optimizer": description,
    }
    return (json.dumps(body, indent=1, allow_nan=False) + "\n").encode("utf-8")


def index_metadata(description: dict[str, Any], prefix: str | None):
    """The master's last step of a sharded save: ``{index name: bytes}`` for a plan."""
    return lambda plan: {naming.optimizer_index_name(prefix): index_bytes(plan, description)}


def single_file_format(checkpoint: str | os.PathLike) -> str:
    """The format of a one-file optimizer save at ``checkpoint``: what its name says."""
    return "safetensors" if os.fspath(checkpoint).lower().endswith(".safetensors") else "torch"


def write_full(writer, file_name: str | None, full: dict[str, Any], opts: OptimizerSaveOptions, subdir: str = ""):
    """A full ``state_dict()`` (CPU tensors): one torch or flat safetensors file, or ColossalAI's sharded layout."""
    if not opts.shard:
        default = "optimizer.safetensors" if opts.single_file == "safetensors" else "optimizer.bin"
        name = file_name if file_name is not None else (f"{subdir}/" if subdir else "") + default
        if opts.single_file == "safetensors":
            return [colossal_optim.write_flat(writer, name, full)]
        with writer.open_stream(name) as stream:
            torch_format.save(full, stream)
        return [stream.record]
    shards = split_greedy(colossal_optim.entry_sizes(full), opts.max_shard_bytes).shards
    return colossal_optim.write(writer, full, shards, prefix=opts.prefix, subdir=subdir)


def read_saved(located: Located, *, verify: bool = False) -> tuple[ostate.SavedOptimizer, dict[str, str] | None]:
    """The saved optimizer (sizes, and with ``verify`` checksums, checked first) and, for
    ckptio's layout, the ``weight_map`` of its state tensors (still :class:`TensorRef` in it)."""
    check_against_manifest(located.folder, located.files, checksums=verify)
    path = located.entry_path
    if located.layout == "torch":
        state_dict = torch_format.load(path)
        found = torch_kind(state_dict)
        if found[0] not in (None, "optimizer"):
            raise wrong_kind(path, "optimizer", found)
        return ostate.saved_from_state_dict(state_dict, path=str(path)), None
    if located.layout == "safetensors":
        return ostate.saved_from_state_dict(colossal_optim.read_flat_file(path), path=str(path)), None
    if located.layout == "colossalai":
        state_dict, _ = colossal_optim.read(path)
        return ostate.saved_from_state_dict(state_dict, path=str(path)), None
    raw = read_json_file(path, what="optimizer index")
    saved = ostate.saved_from_description(raw.get("optimizer") if isinstance(raw, dict) else None, path=str(path))
    return saved, located.index.weight_map
