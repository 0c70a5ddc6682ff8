"""Tagged JSON for the small values of optimizer and scheduler state (no pickle).

Hyper-parameters and scheduler state are numbers, strings, lists and dicts, plus a few
things plain JSON loses: tuples (``betas``), scalar tensors (Adam's ``step`` with its
dtype), small tensors (a tensor ``lr``). Those are written as one-key objects with a
reserved tag, so ``decode(encode(x)) == x`` with the same Python and torch types.
Floats go through Python's ``repr`` (exact for float64, hence for float32 and bfloat16).
"""

from __future__ import annotations

from typing import Any

import torch

from ckptio.formats import dtypes

TUPLE_TAG = "__tuple__"
TENSOR_TAG = "__tensor__"
DICT_TAG = "__dict__"  # a real dict whose only key happens to be one of the tags
_TAGS = (TUPLE_TAG, TENSOR_TAG, DICT_TAG)
# Tensors larger than this belong in safetensors, not in JSON.
MAX_JSON_TENSOR_ELEMENTS = 4096


class NotJSONable(ValueError):
    """A value has no exact JSON form; ``where`` says which entry."""

    def __init__(self, where: str, value: Any) -> None:
        self.where = where
        super().__init__(f"{where or 'value'} of type {type(value).__name__} has no exact JSON form")


def encode(value: Any, where: str = "") -> Any:
    """The JSON-ready form of ``value``; raises :class:`NotJSONable` when there is none."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return value
    if isinstance(value, tuple):
        return {TUPLE_TAG: [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise NotJSONable(where, value)
        body = {k: encode(v, f"{where}.{k}" if where else k) for k, v in value.items()}
        return {DICT_TAG: body} if len(body) == 1 and next(iter(body)) in _TAGS else body
    if isinstance(value, torch.Tensor) and type(value) is torch.Tensor:
        return {TENSOR_TAG: encode_tensor(value, where)}
    raise NotJSONable(where, value)


def encode_tensor(tensor: torch.Tensor, where: str = "") -> dict[str, Any]:
    if tensor.is_complex() or tensor.numel() > MAX_JSON_TENSOR_ELEMENTS or tensor.dtype not in _JSON_DTYPES:
        raise NotJSONable(where, tensor)
    cpu = tensor.detach().cpu()
    data = cpu.item() if cpu.dim() == 0 else cpu.to(_JSON_DTYPES[cpu.dtype]).tolist()
    out: dict[str, Any] = {"dtype": dtypes.to_name(tensor.dtype), "shape": list(tensor.shape), "data": data}
    if tensor.device.type != "cpu":
        out["device"] = str(tensor.device)
    return out


_JSON_DTYPES = {
    torch.float64: torch.float64,
    torch.float32: torch.float64,
    torch.float16: torch.float64,
    torch.bfloat16: torch.float64,
    torch.int64: torch.int64,
    torch.int32: torch.int64,
    torch.int16: torch.int64,
    torch.int8: torch.int64,
    torch.uint8: torch.int64,
    torch.bool: torch.bool,
}


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`. Tensors come back on the CPU."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((tag, body),) = value.items()
            if tag == TUPLE_TAG:
                return tuple(decode(v) for v in _expect(body, list, tag))
            if tag == TENSOR_TAG:
                return decode_tensor(_expect(body, dict, tag))
            if tag == DICT_TAG:
                return {k: decode(v) for k, v in _expect(body, dict, tag).items()}
        return {k: decode(v) for k, v in value.items()}
    return value


def decode_tensor(body: dict[str, Any]) -> torch.Tensor:
    dtype = dtypes.from_name(body.get("dtype"))
    shape = body.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tagged tensor has an invalid shape {shape!r}")
    try:
        tensor = torch.tensor(body.get("data"), dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"tagged tensor data does not fit {dtype}: {exc}") from exc
    if list(tensor.shape) != shape:
        raise ValueError(f"tagged tensor data has shape {list(tensor.shape)}, header says {shape}")
    return tensor


def _expect(body: Any, kind: type, tag: str) -> Any:
    if not isinstance(body, kind):
        raise ValueError(f"{tag} must hold a {kind.__name__}, got {type(body).__name__}")
    return body
