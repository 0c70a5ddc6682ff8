"""Tagged JSON for the small values of optimizer and scheduler state (no pickle).

Hyper-parameters and scheduler state are numbers, strings, lists and dicts, plus a few
things plain JSON loses: tuples (``betas``), scalar tensors (Adam's ``step`` with its
dtype), small tensors (a tensor ``lr``). Those are written as one-key objects with a
reserved tag, so ``decode(encode(x)) == x`` with the same Python and torch types.
Floats go through Python's ``repr`` (exact for float64, hence for float32 and bfloat16).
JSON has no infinity or NaN (``json.dumps`` writes ``Infinity``, which other parsers refuse;
ReduceLROnPlateau's ``best`` starts at ``inf``), so those are tagged: ``{"__float__": "inf"}``,
``"-inf"``, ``"nan"``, or the 64 bits in hex (``"0xfff8000000000000"``) for any other NaN, so
the bits come back exactly. Files written before the tag (bare ``Infinity``) still read.

Optimizer state may hold tensors anywhere inside lists, tuples and dicts (LBFGS's ``old_dirs``);
``encode(..., on_tensor=...)`` lets the caller replace each one by a reference to a file
(``{"__ref__": ...}``) and ``decode(..., on_ref=...)`` turns references back into objects.

``encode(..., any_keys=True)`` also writes dicts whose keys are not all strings (an optimizer
``state_dict()`` keyed by parameter id, inside a Lightning checkpoint) as
``{"__items__": [[key, value], ...]}``, keys being numbers, strings, None or tuples of them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any

import torch

from ckptio.formats import dtypes

TUPLE_TAG = "__tuple__"
TENSOR_TAG = "__tensor__"
DICT_TAG = "__dict__"  # a real dict whose only key happens to be one of the tags
REF_TAG = "__ref__"  # a tensor stored elsewhere (``on_tensor`` / ``on_ref``)
ITEMS_TAG = "__items__"  # a dict with keys that are not all strings (``any_keys``)
FLOAT_TAG = "__float__"  # infinity or NaN, which JSON cannot write
_TAGS = (TUPLE_TAG, TENSOR_TAG, DICT_TAG, REF_TAG, ITEMS_TAG, FLOAT_TAG)
# Tensors larger than this belong in safetensors, not in JSON.
MAX_JSON_TENSOR_ELEMENTS = 4096


class NotJSONable(ValueError):
    """A value has no exact JSON form; ``where`` says which entry."""

    def __init__(self, where: str, value: Any) -> None:
        self.where = where
        super().__init__(f"{where or 'value'} of type {type(value).__name__} has no exact JSON form")


Position = tuple[int | str, ...]
TensorHook = Callable[[torch.Tensor, Position, str], Any]


def encode(value: Any, where: str = "", on_tensor: TensorHook | None = None, *, any_keys: bool = False) -> Any:
    """The JSON-ready form of ``value``; raises :class:`NotJSONable` when there is none.

    ``on_tensor(tensor, position, where)``, when given, returns the JSON form of every tensor
    inside ``value`` (``position``: the list indices and dict keys leading to it); without
    it, tensors are inlined as tagged data (small ones only). ``any_keys``: dict keys may be
    numbers, None and tuples too (else only strings).
    """
    return _encode(value, where, (), on_tensor, any_keys)


def _encode(value: Any, where: str, pos: Position, on_tensor: TensorHook | None, any_keys: bool = False) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, float):
        return encode_float(value)
    if isinstance(value, int):
        return value
    if isinstance(value, tuple):
        return {TUPLE_TAG: [_encode(v, f"{where}[{i}]", (*pos, i), on_tensor, any_keys) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]", (*pos, i), on_tensor, any_keys) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            if not any_keys or not all(_plain_key(k) for k in value):
                raise NotJSONable(where, value)
            return {
                ITEMS_TAG: [
                    [_encode(k, where, pos, None), _encode(v, f"{where}[{k!r}]", (*pos, k), on_tensor, any_keys)]
                    for k, v in value.items()
                ]
            }
        body = {k: _encode(v, f"{where}.{k}" if where else k, (*pos, k), on_tensor, any_keys) for k, v in value.items()}
        return {DICT_TAG: body} if len(body) == 1 and next(iter(body)) in _TAGS else body
    if isinstance(value, torch.Tensor) and on_tensor is not None:
        return on_tensor(value, pos, where)
    if isinstance(value, torch.Tensor) and type(value) is torch.Tensor:
        return {TENSOR_TAG: encode_tensor(value, where)}
    raise NotJSONable(where, value)


def _plain_key(key: Any) -> bool:
    if key is None or type(key) in (bool, int, float, str):
        return True
    return type(key) is tuple and all(_plain_key(k) for k in key)


def _bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


_NAMED = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_NAMED_BITS = {_bits(v): name for name, v in _NAMED.items()}


def encode_float(x: float) -> float | dict[str, str]:
    """``x`` itself when finite, else its tagged form (see the module doc)."""
    if math.isfinite(x):
        return x
    bits = _bits(x)
    return {FLOAT_TAG: _NAMED_BITS.get(bits, f"0x{bits:016x}")}


def decode_float(body: Any) -> float | None:
    """The float of a ``__float__`` tag's body, or None when it is not one."""
    if not isinstance(body, str):
        return None
    if body in _NAMED:
        return _NAMED[body]
    if body.startswith("0x") and len(body) == 18:
        try:
            return struct.unpack("<d", struct.pack("<Q", int(body, 16)))[0]
        except ValueError:
            return None
    return None


def _floats_tagged(data: Any) -> Any:
    if isinstance(data, list):
        return [_floats_tagged(v) for v in data]
    return encode_float(data) if isinstance(data, float) else data


def has_exact_form(tensor: torch.Tensor) -> bool:
    """Whether :func:`encode_tensor` can write ``tensor`` (its dtype and size; not its type)."""
    return not tensor.is_complex() and tensor.numel() <= MAX_JSON_TENSOR_ELEMENTS and tensor.dtype in _JSON_DTYPES


def encode_tensor(tensor: torch.Tensor, where: str = "") -> dict[str, Any]:
    if not has_exact_form(tensor):
        raise NotJSONable(where, tensor)
    cpu = tensor.detach().cpu()
    data = cpu.item() if cpu.dim() == 0 else cpu.to(_JSON_DTYPES[cpu.dtype]).tolist()
    out: dict[str, Any] = {"dtype": dtypes.to_name(tensor.dtype), "shape": list(tensor.shape)}
    out["data"] = _floats_tagged(data)
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


def decode(value: Any, on_ref: Callable[[Any], Any] | None = None) -> Any:
    """The inverse of :func:`encode`. Tensors come back on the CPU; ``{"__ref__": body}``
    becomes ``on_ref(body)`` when given (else it stays a plain dict, as before the tag existed)."""
    if isinstance(value, list):
        return [decode(v, on_ref) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((tag, body),) = value.items()
            if tag == TUPLE_TAG:
                return tuple(decode(v, on_ref) for v in _expect(body, list, tag))
            if tag == TENSOR_TAG:
                return decode_tensor(_expect(body, dict, tag))
            if tag == DICT_TAG:
                return {k: decode(v, on_ref) for k, v in _expect(body, dict, tag).items()}
            if tag == ITEMS_TAG:
                return dict(_item(pair, on_ref) for pair in _expect(body, list, tag))
            if tag == REF_TAG and on_ref is not None:
                return on_ref(body)
            if tag == FLOAT_TAG and (number := decode_float(body)) is not None:
                return number
        return {k: decode(v, on_ref) for k, v in value.items()}
    return value


def _item(pair: Any, on_ref: Callable[[Any], Any] | None) -> tuple[Any, Any]:
    if not isinstance(pair, list) or len(pair) != 2:
        raise ValueError(f"{ITEMS_TAG} must hold [key, value] pairs, got {pair!r}")
    key = decode(pair[0])
    if not _plain_key(key):
        raise ValueError(f"{ITEMS_TAG} key {pair[0]!r} is not a number, string, None or tuple of them")
    return key, decode(pair[1], on_ref)


def decode_tensor(body: dict[str, Any]) -> torch.Tensor:
    dtype = dtypes.from_name(body.get("dtype"))
    shape = body.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tagged tensor has an invalid shape {shape!r}")
    try:
        tensor = torch.tensor(decode(body.get("data")), dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"tagged tensor data does not fit {dtype}: {exc}") from exc
    if list(tensor.shape) != shape:
        raise ValueError(f"tagged tensor data has shape {list(tensor.shape)}, header says {shape}")
    return tensor


def _expect(body: Any, kind: type, tag: str) -> Any:
    if not isinstance(body, kind):
        raise ValueError(f"{tag} must hold a {kind.__name__}, got {type(body).__name__}")
    return body
