"""How a checkpoint's keys fit a live state: the load report, and checkpoint keys matched to live keys."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ckptio.state.model import WRAPPER_PREFIXES


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


def strip_wrapper_prefix(key: str) -> str:
    """``module.layer.weight`` -> ``layer.weight``, for files written from wrapped models."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def match_keys(file_keys: list[str], live_keys) -> tuple[dict[str, str], list[str]]:
    """Map checkpoint keys to live keys, accepting ``module.`` style prefixes; return unexpected."""
    mapping, unexpected = {}, []
    for key in file_keys:
        if key in live_keys:
            mapping[key] = key
        elif (stripped := strip_wrapper_prefix(key)) in live_keys:
            mapping[key] = stripped
        else:
            unexpected.append(key)
    return mapping, unexpected
