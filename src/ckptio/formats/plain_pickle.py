"""Pickles of plain values only: ColossalAI's safetensors optimizer files keep their non-tensor
values (the param groups, a Python ``step``) as pickles inside uint8 tensors.

Reading refuses every global a pickle names (``find_class``), which is how a pickle runs code
(``os.system`` through ``REDUCE``): only what the opcodes build on their own comes back: ``None``,
bools, numbers, strings, bytes, lists, tuples, dicts and sets. That is all torch's optimizers put
in their param groups, and the same trust as ``torch.load(weights_only=True)`` (which also allows
tensors and a few torch types; a tensor pickled this way is refused). Writing checks the value is
plain first, so every pickle we write reads back here.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

from ckptio.errors import CheckpointFormatError, UnsafeCheckpointError

PROTOCOL = 4  # readable by every Python 3 that torch supports
_PLAIN_LEAVES = (type(None), bool, int, float, str, bytes)


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name}")


def is_plain(value: Any) -> bool:
    """Whether ``value`` pickles without naming any global (and so reads back with :func:`loads`)."""
    if type(value) in _PLAIN_LEAVES:
        return True
    if type(value) in (list, tuple, set, frozenset):
        return all(is_plain(v) for v in value)
    if type(value) is dict:
        return all(is_plain(k) and is_plain(v) for k, v in value.items())
    return False


def dumps(value: Any) -> bytes:
    """The pickle of a plain value (check :func:`is_plain` first; anything else raises ``ValueError``)."""
    if not is_plain(value):
        raise ValueError(f"{type(value).__name__} is not a plain value")
    return pickle.dumps(value, protocol=PROTOCOL)


def loads(data: bytes, *, path: str | os.PathLike, what: str) -> Any:
    """Unpickle ``data`` (``what`` of the file ``path``, for messages) without running any code."""
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("global "):
            raise UnsafeCheckpointError(
                f"refused to unpickle {what}: it references {str(exc).removeprefix('global ')}, and only plain "
                "values (numbers, strings, lists, tuples, dicts) are read from a pickle",
                path=path,
            ) from None
        raise CheckpointFormatError(f"{what} is not a valid pickle: {exc}", path=path) from exc
    except (EOFError, ValueError, TypeError, IndexError, KeyError, MemoryError, RecursionError) as exc:
        raise CheckpointFormatError(f"{what} is not a valid pickle: {exc!r}", path=path) from exc
