"""The one table between torch dtypes and the dtype names files use.

safetensors names dtypes with short codes (``F32``); our JSON metadata uses torch's own
names (``float32``). Unknown names raise instead of falling back to a default, so a file
from a newer writer is never read with the wrong element size.

``F4`` is packed: torch's ``float4_e2m1fn_x2`` holds two 4-bit values per byte, and a
safetensors header counts the 4-bit values, so the file's last dimension is twice torch's
(the reference ``safetensors`` library writes and reads it so: torch ``[2, 3]`` is ``F4``
``[2, 6]``). :func:`file_shape` and :func:`torch_shape` convert; every other code maps one
torch element to one file element.
"""

from __future__ import annotations

import torch

from ckptio.errors import CheckpointFormatError

_SAFETENSORS_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _code in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e8m0fnu", "F8_E8M0"),
    ("float4_e2m1fn_x2", "F4"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        _SAFETENSORS_CODES[getattr(torch, _name)] = _code

_FROM_CODE = {code: dtype for dtype, code in _SAFETENSORS_CODES.items()}
# codes whose file elements are smaller than a torch element: file elements per torch element
_PACKED = {"F4": 2}


def to_safetensors_code(dtype: torch.dtype, *, path=None) -> str:
    try:
        return _SAFETENSORS_CODES[dtype]
    except KeyError:
        raise CheckpointFormatError(f"dtype {dtype} has no safetensors code", path=path) from None


def from_safetensors_code(code: str, *, path=None) -> torch.dtype:
    try:
        return _FROM_CODE[code]
    except (KeyError, TypeError):
        raise CheckpointFormatError(
            f"unknown safetensors dtype {code!r}; known: {sorted(_FROM_CODE)}", path=path
        ) from None


def file_shape(dtype: torch.dtype, shape: tuple[int, ...] | list[int], *, path=None) -> list[int]:
    """The shape a safetensors header gives a torch tensor of ``dtype`` and ``shape``."""
    per = _PACKED.get(_SAFETENSORS_CODES.get(dtype, ""), 1)
    shape = [int(d) for d in shape]
    if per == 1:
        return shape
    if not shape:
        raise CheckpointFormatError(
            f"a 0-dim {to_name(dtype)} tensor has no safetensors form: its code counts "
            f"{per} values per element along the last dimension; reshape it to [1]",
            path=path,
        )
    return [*shape[:-1], shape[-1] * per]


def torch_shape(code: str, shape: list[int], *, path=None, name: str = "") -> tuple[int, ...]:
    """The torch shape of a tensor that a safetensors header gives ``code`` and ``shape``."""
    per = _PACKED.get(code, 1)
    if per == 1:
        return tuple(shape)
    if not shape or shape[-1] % per:
        raise CheckpointFormatError(
            f"tensor {name!r}: {code} packs {per} values per byte, so its last dimension must be a "
            f"multiple of {per}; the header gives shape {shape}",
            path=path,
        )
    return (*shape[:-1], shape[-1] // per)


def to_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``, the name used in our JSON."""
    return str(dtype).removeprefix("torch.")


def from_name(name: str, *, path=None) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointFormatError(f"unknown dtype name {name!r}", path=path)
    return dtype


def element_size(dtype: torch.dtype) -> int:
    """Bytes per torch element (``itemsize``: no tensor is made, headers of many tensors parse fast)."""
    return dtype.itemsize


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def cast_refusal(found: torch.dtype, expected: torch.dtype) -> str | None:
    """Why a tensor stored as ``found`` is not cast into a live tensor of ``expected`` (None: it is).

    Casts that keep the meaning of the values are made, as ``load_state_dict`` makes them:
    between floating-point dtypes (fp32 <-> bf16; precision may be lost, as with ``copy_``),
    between complex dtypes, and from an integer dtype to one that holds all its values
    (int32 -> int64). A cast across kinds (integer <-> floating point, bool) or one that narrows
    integers would silently change values (a float index truncated, an int64 wrapped), so it is
    a mismatch instead.
    """
    if found == expected:
        return None
    have, want = _kind(found), _kind(expected)
    if have != want:
        return f"no cast from {have} to {want}"
    if have == "integer":
        try:
            src, dst = torch.iinfo(found), torch.iinfo(expected)
        except TypeError:
            return "no cast between these integer dtypes"
        if src.min < dst.min or src.max > dst.max:
            return f"{to_name(expected)} cannot hold every {to_name(found)} value"
    return None
