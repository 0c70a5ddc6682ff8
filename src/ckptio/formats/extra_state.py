"""Modules' extra state (``get_extra_state()``) that is not a tensor, as tagged JSON.

torch puts whatever ``get_extra_state()`` returns into ``state_dict()`` under
``<module>._extra_state``. A tensor (TransformerEngine's serialized FP8 metadata) is saved like
any weight, in the weights files. Anything else (a dict of Python values) goes where each
format has room for it, as :mod:`ckptio.formats.tagged_json`, so ``transformers`` and
safetensors readers still load the weights:

* a sharded folder: the index's ``metadata["extra_state"]`` (``{key: tagged JSON}``);
* one safetensors file: ``__metadata__["ckptio_extra_state"]``, the same object as a JSON
  string (safetensors metadata holds strings only);
* one ``torch.save`` file: the values themselves in the dict, as ``torch.save(model.state_dict())``
  writes them (so plain torch loads them back), limited to what JSON holds, so
  ``torch.load(weights_only=True)`` reads them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ckptio.errors import CheckpointFormatError
from ckptio.formats import tagged_json

INDEX_KEY = "extra_state"
METADATA_KEY = "ckptio_extra_state"


def encode(values: dict[str, Any], *, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{key: tagged JSON}``; a value with no exact JSON form raises, naming its key."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        try:
            out[key] = tagged_json.encode(value, key)
        except tagged_json.NotJSONable as exc:
            raise CheckpointFormatError(
                f"extra state {key!r} ({type(value).__name__}) cannot be saved: {exc}. get_extra_state() may "
                "return a tensor (saved with the weights) or plain values (numbers, strings, lists, tuples, dicts, "
                "small tensors); nothing was saved",
                path=path,
            ) from exc
    return out


def decode(body: Any, *, path: str | os.PathLike | None) -> dict[str, Any]:
    """The inverse of :func:`encode`, checked."""
    if not isinstance(body, dict):
        raise CheckpointFormatError(f"extra state must be a JSON object, got {type(body).__name__}", path=path)
    try:
        return {str(k): tagged_json.decode(v) for k, v in body.items()}
    except ValueError as exc:
        raise CheckpointFormatError(f"malformed extra state: {exc}", path=path) from exc


def to_text(encoded: dict[str, Any]) -> str:
    return json.dumps(encoded, separators=(",", ":"))


def from_text(text: str, *, path: str | os.PathLike | None) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointFormatError(f"{METADATA_KEY} is not valid JSON: {exc}", path=path) from exc
    return decode(body, path=path)
