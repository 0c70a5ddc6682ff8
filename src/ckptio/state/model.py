"""What a model's state looks like on the way to and from the files.

One extraction for every caller (one process or many ranks, sync or async, save or load):
:func:`live_state` gives the model's parameters and persistent buffers by clean name as the
live objects, so a load writes into them and tied parameters stay one object;
:func:`model_state_to_save` drops tied duplicates (the first name is kept, as ``transformers``
and ``safetensors.torch.save_model`` do). Wrappers (DDP, DataParallel, ``torch.compile``,
ckptio's own) are unwrapped so their prefixes never reach the files.

A module's extra state (``get_extra_state()``, under ``<module>._extra_state``) is not a live
tensor: it is a value the module hands out and takes back (``set_extra_state``), whatever its
type or size (TransformerEngine's FP8 metadata is a uint8 tensor whose length varies). So it
is kept apart: :func:`live_state` leaves it out, :func:`extra_state_modules` names the modules
a load hands it back to, and :func:`model_state_to_save` returns the tensor ones with the
weights and the others separately (:mod:`ckptio.formats.extra_state`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ckptio.engine.tensors import is_dtensor
from ckptio.formats.naming import EXTRA_STATE_SUFFIX

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


def extra_state_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose extra state ``state_dict()`` holds (their class overrides
    ``get_extra_state``, torch's own test), by the clean key it is saved under."""
    out: dict[str, nn.Module] = {}
    for name, module in unwrap_model(model).named_modules(remove_duplicate=False):
        if type(module).get_extra_state is not nn.Module.get_extra_state:
            out.setdefault(clean_key(f"{name}.{EXTRA_STATE_SUFFIX}" if name else EXTRA_STATE_SUFFIX), module)
    return out


def _split_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``state_dict(keep_vars=True)`` by clean name, split into live tensors and extra states."""
    extra_keys = extra_state_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for key, value in unwrap_model(model).state_dict(keep_vars=True).items():
        key = clean_key(key)
        if key in extra_keys:
            extra[key] = value
        else:
            tensors[key] = value
    return tensors, extra


def live_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by clean name, as the live objects (``keep_vars``):
    a load writes into them in place, and a tied parameter is one object under two names.
    Extra states are not among them (:func:`extra_state_modules`)."""
    return _split_state(model)[0]


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


def frozen_keys(model: nn.Module) -> list[str]:
    """The keys of the parameters that do not train (``requires_grad=False``), every name of a
    tied one included, in state order. Buffers are never among them: a buffer has no
    ``requires_grad`` to say it is fixed, and many change without a gradient (BatchNorm's
    running statistics, step counters), so they count as trained state."""
    return _frozen(_split_state(model)[0])


def _frozen(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if isinstance(v, nn.Parameter) and not v.requires_grad]


def model_state_to_save(
    model: nn.Module, *, only_trainable: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to write (the live ones, detached, on their device, in any layout, tied
    duplicates dropped, then the extra states that are tensors) and the extra states that are not.
    ``only_trainable`` leaves out the frozen parameters (:func:`frozen_keys`).

    Nothing is copied here: the engine moves each tensor to the CPU when its file is written,
    and an async save copies it once into reused staging buffers.
    """
    state, extra = _split_state(model)
    aliases = tied_aliases(state)
    if only_trainable:
        frozen = set(_frozen(state))
        state = {k: v for k, v in state.items() if k not in frozen}
    tensors = {k: v.detach() for k, v in state.items() if k not in aliases}
    tensors.update({k: v.detach() for k, v in extra.items() if isinstance(v, torch.Tensor)})
    return tensors, {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}


def state_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of :func:`model_state_to_save`."""
    return model_state_to_save(model)[0]
