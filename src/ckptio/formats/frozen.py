"""How a trainable-only model checkpoint records the frozen parameters it leaves out.

``save_model(..., only_trainable=True)`` writes only the parameters that train; the frozen
ones (``requires_grad=False``, e.g. a LoRA run's base model) come back from the base weights
at load time. The checkpoint names every key it left out, so a strict load can tell "left out
on purpose" from "missing":

* a sharded folder: the index's ``metadata`` holds ``"only_trainable": true`` and
  ``"frozen_keys": [...]`` (``transformers`` ignores both);
* one safetensors file: ``__metadata__["ckptio_frozen_keys"]``, the same list as a JSON string
  (safetensors metadata holds strings only).

A ``torch.save`` file has no room for it, so a one-file ``.bin`` save refuses
``only_trainable``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from ckptio.errors import CheckpointFormatError

ONLY_TRAINABLE_KEY = "only_trainable"
INDEX_KEY = "frozen_keys"
METADATA_KEY = "ckptio_frozen_keys"


def index_entries(keys: list[str]) -> dict[str, Any]:
    """The entries a trainable-only sharded save adds to its index's ``metadata``."""
    return {ONLY_TRAINABLE_KEY: True, INDEX_KEY: list(keys)}


def to_text(keys: list[str]) -> str:
    return json.dumps(list(keys), separators=(",", ":"))


def _checked(value: Any, *, path: str | os.PathLike | None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise CheckpointFormatError(f"{INDEX_KEY} must be a list of tensor names, got {value!r:.80}", path=path)
    return value


def from_index(metadata: Mapping[str, Any], *, path: str | os.PathLike | None) -> list[str]:
    """The frozen keys an index says its checkpoint left out ([] for a full checkpoint)."""
    if INDEX_KEY not in metadata:
        return []
    return _checked(metadata[INDEX_KEY], path=path)


def from_metadata(metadata: Mapping[str, str], *, path: str | os.PathLike | None) -> list[str]:
    """The frozen keys a safetensors file's ``__metadata__`` says it left out ([] when none)."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return []
    try:
        return _checked(json.loads(text), path=path)
    except json.JSONDecodeError as exc:
        raise CheckpointFormatError(f"{METADATA_KEY} is not valid JSON: {exc}", path=path) from exc
