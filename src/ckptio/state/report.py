"""How a checkpoint's keys fit a live state: the load report, and checkpoint keys matched to live keys."""

from __future__ import annotations

from collections.abc import Container, Iterable
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
    """What did not fit when a checkpoint was loaded. Empty lists mean a perfect fit.

    Args:
        missing_keys: live keys the checkpoint does not hold (left as they were).
        unexpected_keys: checkpoint keys the live state does not have (not loaded).
        mismatched: keys in both with another shape or dtype (not loaded).
    """

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every key was loaded and nothing was left over."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        """One line per kind of problem, for messages.

        Args:
            limit: the most keys listed per kind (the rest are counted).
        """
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
        level = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in keys)), None)
        if level is None:
            break
        keys = [k[len(level) :] for k in keys]
        stripped += level
        hits = sum(k in live_keys for k in keys)
        if hits > best_hits:
            best, best_hits = stripped, hits
    return best


def match_keys(file_keys: list[str], live_keys: Container[str], prefix: str = "") -> tuple[dict[str, str], list[str]]:
    """Map checkpoint keys to live keys after dropping ``prefix`` (the checkpoint's wrapper
    prefix, see :func:`wrapper_prefix`) from each; return the mapping and the unexpected keys."""
    mapping, unexpected = {}, []
    for key in file_keys:
        live = key[len(prefix) :] if key.startswith(prefix) else key
        if live in live_keys:
            mapping[key] = live
        else:
            unexpected.append(key)
    return mapping, unexpected
