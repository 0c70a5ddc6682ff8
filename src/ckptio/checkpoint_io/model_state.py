"""What a model's state looks like on the way to and from the files.

Wrappers (DDP, DataParallel, ``torch.compile``) are unwrapped so their prefixes never
reach the files; tied tensors are saved once and stay tied on load because loading writes
into the live tensors.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

_COMPILED_SEGMENT = "_orig_mod."
_WRAPPER_PREFIXES = ("module.", _COMPILED_SEGMENT)


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


def wrapper_prefix(file_keys: Iterable[str], live_keys: Container[str]) -> str:
    """The wrapper prefix to drop from every key of a checkpoint (``""`` for none).

    Decided once for the whole checkpoint, never per key: a model may own a submodule called
    ``module`` (``AveragedModel``, wrapper classes), so ``module.linear.weight`` is either its
    own tensor or a DDP-saved ``linear.weight``, and only all the keys together tell which.
    A level (``module.``, ``_orig_mod.``) is a candidate only when every key carries it;
    among the candidates (none stripped, one level, two, ...) the one under which most keys
    name a live tensor wins, and a tie keeps fewer levels, so names that already fit are
    never touched.
    """
    keys = list(dict.fromkeys(file_keys))
    best, best_hits, stripped = "", sum(k in live_keys for k in keys), ""
    while keys:
        level = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in keys)), None)
        if level is None:
            break
        keys = [k[len(level) :] for k in keys]
        stripped += level
        hits = sum(k in live_keys for k in keys)
        if hits > best_hits:
            best, best_hits = stripped, hits
    return best


def _storage_identity(t: torch.Tensor):
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def alias_groups(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map each alias key to the first key holding the same tensor memory (tied weights)."""
    first: dict[object, str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state.items():
        if (
            not isinstance(tensor, torch.Tensor)
            or type(tensor) is not torch.Tensor
            and not isinstance(tensor, nn.Parameter)
        ):
            continue
        ident = _storage_identity(tensor)
        if ident is None:
            continue
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


def model_state_for_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's tensors by clean name, CPU and contiguous, each tied tensor only once.

    Returns ``(state, aliases)``; ``aliases`` maps dropped names to the name kept.
    """
    raw = unwrap_model(model).state_dict()
    raw = {clean_key(k): v for k, v in raw.items()}
    aliases = alias_groups(raw)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if key in aliases:
            continue
        state[key] = to_cpu_contiguous(tensor)
    return state, aliases


def to_cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor


@dataclass(frozen=True)
class Mismatch:
    key: str
    expected: str
    found: str
    file: str = ""  # the shard holding the key, when the checkpoint is a folder

    def __str__(self) -> str:
        where = f" (in {self.file})" if self.file else ""
        return f"{self.key}: model has {self.expected}, checkpoint has {self.found}{where}"


@dataclass
class LoadReport:
    """What did not fit when a checkpoint was loaded. Empty lists mean a perfect fit."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        parts = []
        for title, items in (
            ("missing from the checkpoint", self.missing_keys),
            ("unexpected in the checkpoint", self.unexpected_keys),
            ("shape/dtype mismatch", [str(m) for m in self.mismatched]),
        ):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
                parts.append(f"{len(items)} {title}: {shown}")
        return "; ".join(parts) or "all keys match"


def describe_tensor(dtype: torch.dtype, shape) -> str:
    return f"{str(dtype).removeprefix('torch.')}{list(shape)}"
