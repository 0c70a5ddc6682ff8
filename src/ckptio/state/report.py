"""How a checkpoint's keys fit a live state: the load report, and checkpoint keys matched to live keys."""

from __future__ import annotations

import functools
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ckptio.state.model import WRAPPER_PREFIXES

#: A checkpoint key -> model key map: a dict (keys it does not name keep their name) or a
#: function; ``None`` as the model key drops the checkpoint key.
KeyMap = Mapping[str, str | None] | Callable[[str], str | None]


@dataclass(frozen=True)
class Mismatch:
    key: str
    expected: str
    found: str
    file: str = ""  # the shard holding the key, when the checkpoint is a folder
    reason: str = ""  # why a dtype difference was not cast

    def __str__(self) -> str:
        where = f" (in {self.file})" if self.file else ""
        why = f": {self.reason}" if self.reason else ""
        return f"{self.key}: model has {self.expected}, checkpoint has {self.found}{where}{why}"


@dataclass(frozen=True)
class Cast:
    """A tensor loaded into a live tensor of another dtype (``from_dtype`` in the checkpoint)."""

    key: str
    from_dtype: str
    to_dtype: str
    file: str = ""

    def __str__(self) -> str:
        where = f" (in {self.file})" if self.file else ""
        return f"{self.key}: {self.from_dtype} -> {self.to_dtype}{where}"


@dataclass
class LoadReport:
    """How a checkpoint fit the model it was loaded into.

    ``missing_keys`` (model tensors nothing loaded), ``unexpected_keys`` (checkpoint tensors no
    model tensor takes) and ``mismatched`` (shapes, or dtypes that are not cast) make a load
    not ``ok``; ``cast`` (tensors converted to the model's dtype) and ``dropped_keys``
    (checkpoint keys a ``key_map`` dropped) are what a good load did. ``frozen_keys`` are the
    model tensors a trainable-only checkpoint left out on purpose (frozen when it was saved):
    not loaded, kept as the model holds them (its base weights), and no reason to fail.

    Args:
        missing_keys: live keys the checkpoint does not hold (left as they were).
        unexpected_keys: checkpoint keys the live state does not have (not loaded).
        mismatched: keys in both with another shape, or a dtype that is not cast (not loaded).
        cast: tensors loaded after a dtype cast into the live tensor's dtype.
        dropped_keys: checkpoint keys a ``key_map`` dropped on purpose.
        frozen_keys: model keys a trainable-only checkpoint left out on purpose (not loaded).
    """

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    cast: list[Cast] = field(default_factory=list)
    dropped_keys: list[str] = field(default_factory=list)
    frozen_keys: list[str] = field(default_factory=list)

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
            ("cast to the model's dtype", [str(c) for c in self.cast]),
            ("dropped by key_map", self.dropped_keys),
            (
                "left out of this trainable-only checkpoint (frozen when saved; kept as the model has them)",
                self.frozen_keys,
            ),  # fmt: skip
        ):
            if items:
                shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
                parts.append(f"{len(items)} {title}: {shown}")
        return "; ".join(parts) or "all keys match"


def merge_reports(reports: Sequence[LoadReport]) -> LoadReport:
    """One report for ranks whose models hold different keys (pipeline stages): a checkpoint
    key is unexpected (or dropped) only when every rank's report says so (no rank takes it);
    what any rank misses, mismatches, casts or left frozen is listed once, in rank order."""

    def union(items):
        seen, out = set(), []
        for item in (x for report in reports for x in items(report)):
            if str(item) not in seen:
                seen.add(str(item))
                out.append(item)
        return out

    def everywhere(items):
        common = set(items(reports[0])).intersection(*(items(r) for r in reports[1:]))
        return [k for k in items(reports[0]) if k in common]

    return LoadReport(
        missing_keys=union(lambda r: r.missing_keys),
        unexpected_keys=everywhere(lambda r: r.unexpected_keys),
        mismatched=union(lambda r: r.mismatched),
        cast=union(lambda r: r.cast),
        dropped_keys=everywhere(lambda r: r.dropped_keys),
        frozen_keys=union(lambda r: r.frozen_keys),
    )


def describe_tensor(dtype: torch.dtype, shape) -> str:
    return f"{str(dtype).removeprefix('torch.')}{list(shape)}"


def key_mapper(key_map: KeyMap | None) -> Callable[[str], str | None]:
    """``key_map`` as one function from checkpoint key to model key (None: drop the key).

    A dict renames the keys it names (to None: drops them) and leaves the others as they are;
    a function decides for every key. Anything else, or a function returning something other
    than a string or None, is a ``TypeError`` naming the key.
    """
    if key_map is None:
        return _identity
    if isinstance(key_map, Mapping):
        table = dict(key_map)
        for key, value in table.items():
            if value is not None and not isinstance(value, str):
                raise TypeError(f"key_map[{key!r}] is {value!r}; expected a model key (str) or None to drop it")
        return lambda key: table.get(key, key)
    if not callable(key_map):
        raise TypeError(f"key_map must be a dict or a function from checkpoint key to model key, got {key_map!r}")

    @functools.cache  # asked once per key and wrapper-prefix candidate: the user's function runs once per key
    def mapped(key: str) -> str | None:
        value = key_map(key)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"key_map({key!r}) returned {value!r}; expected a model key (str) or None to drop it")
        return value

    return mapped


def _identity(key: str) -> str | None:
    return key


def wrapper_prefix(
    file_keys: Iterable[str], live_keys: Container[str], to_model: Callable[[str], str | None] = _identity
) -> str:
    """The wrapper prefix to drop from every key of a checkpoint (``""`` for none).

    Decided once for the whole checkpoint, never per key: a model may own a submodule called
    ``module`` (``AveragedModel``, wrapper classes), so ``module.linear.weight`` is either its
    own tensor or a DDP-saved ``linear.weight``, and only all the keys together tell which.
    A level (``module.``, ``_orig_mod.``) is a candidate only when every key carries it;
    among the candidates (none stripped, one level, two, ...) the one under which most keys
    name a live tensor (through ``to_model``, a load's ``key_map``) wins, and a tie keeps
    fewer levels, so names that already fit are never touched.
    """
    keys = list(dict.fromkeys(file_keys))

    def hits(candidates: list[str]) -> int:
        return sum(1 for k in candidates if (live := to_model(k)) is not None and live in live_keys)

    best, best_hits, stripped = "", hits(keys), ""
    while keys:
        level = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in keys)), None)
        if level is None:
            break
        keys = [k[len(level) :] for k in keys]
        stripped += level
        found = hits(keys)
        if found > best_hits:
            best, best_hits = stripped, found
    return best


def match_keys(
    file_keys: list[str],
    live_keys: Container[str],
    prefix: str = "",
    to_model: Callable[[str], str | None] = _identity,
) -> tuple[dict[str, str], list[str], list[str]]:
    """Map checkpoint keys to live keys: drop ``prefix`` (the checkpoint's wrapper prefix, see
    :func:`wrapper_prefix`) from each, then ``to_model`` (a load's ``key_map``). Returns the
    mapping, the unexpected keys (mapped to no live key) and the dropped ones (mapped to None),
    each as the checkpoint names it."""
    mapping, unexpected, dropped = {}, [], []
    for key in file_keys:
        live = to_model(key[len(prefix) :] if key.startswith(prefix) else key)
        if live is None:
            dropped.append(key)
        elif live in live_keys:
            mapping[key] = live
        else:
            unexpected.append(key)
    return mapping, unexpected, dropped
