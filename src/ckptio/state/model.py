"""What a model's state looks like on the way to and from the files.

One extraction for every caller (one process or many ranks, sync or async, save or load):
:func:`live_state` gives the model's parameters and persistent buffers by clean name as the
live objects, so a load writes into them and tied parameters stay one object;
:func:`state_to_save` drops tied duplicates (the first name is kept, as ``transformers``
and ``safetensors.torch.save_model`` do). Wrappers (DDP, DataParallel, ``torch.compile``,
ckptio's own) are unwrapped so their prefixes never reach the files.
"""

from __future__ import annotations

import torch
from torch import nn

from ckptio.engine.tensors import is_dtensor

_COMPILED_SEGMENT = "_orig_mod."
WRAPPER_PREFIXES = ("module.", _COMPILED_SEGMENT)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel off DDP / DataParallel / torch.compile / ckptio wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "unwrap") and callable(model.unwrap) and getattr(model, "_ckptio_wrapper", False):
            model = model.unwrap()
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            break
    return model


def clean_key(key: str) -> str:
    """Drop ``_orig_mod.`` segments that ``torch.compile`` leaves inside submodule names."""
    return key.replace(_COMPILED_SEGMENT, "")


def live_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by clean name, as the live objects (``keep_vars``):
    a load writes into them in place, and a tied parameter is one object under two names."""
    return {clean_key(k): v for k, v in unwrap_model(model).state_dict(keep_vars=True).items()}


def tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map each alias key (tied weights) to the first key holding the same tensor.

    DTensors and meta tensors are compared by object identity (a tied parameter is one object;
    meta tensors have no memory to compare), plain tensors by storage, offset, shape and
    strides, so every rank finds the same aliases whatever its shard holds. Empty tensors
    share no memory and are never aliases.
    """
    first: dict[object, str] = {}
    aliases: dict[str, str] = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        if is_dtensor(t) or t.device.type == "meta":
            ident: object = ("object", id(t))
        elif t.numel() == 0:
            continue
        else:
            ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


def state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors (detached, on their device, in any layout) with tied duplicates dropped.

    Nothing is copied here: the engine moves each tensor to the CPU when its file is written,
    and an async save copies it once into reused staging buffers.
    """
    state = live_state(model)
    aliases = tied_aliases(state)
    return {k: v.detach() for k, v in state.items() if k not in aliases}
