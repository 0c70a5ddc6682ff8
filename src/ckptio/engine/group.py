"""The ranks of a save or load, and collective steps that survive a failing rank.

A :class:`Group` is the process group a checkpoint operation runs on. ``Group.of_one()`` is a
private world of one: it never talks to other ranks even when a process group exists, so a
call made on the master alone (``if rank == 0: booster.save_model(...)`` with a plugin-less
Booster) runs the same engine as a real multi-rank save without waiting for peers.

Every step of a multi-rank save or load that can fail locally (planning, opening files,
writing, committing) runs inside :func:`collective_step`: the local exception is caught,
every rank's outcome is gathered, and if any rank failed the SAME
:class:`DistributedCheckpointError`, naming every failed rank and its message, is raised on
all ranks. So one rank's full disk never leaves the others waiting in the next collective.

A world of one (no process group) runs the step directly and wraps nothing: the user sees
the original exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from ckptio.errors import DistributedCheckpointError

T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """The ranks taking part in a checkpoint operation (``group=None``: the default group;
    ``solo=True``: this process alone, whatever process groups exist)."""

    group: Any = None
    solo: bool = False

    @classmethod
    def of_one(cls) -> Group:
        """A private world of one: rank 0 of 1, every collective a local no-op."""
        return cls(None, solo=True)

    @property
    def active(self) -> bool:
        """Whether collectives really talk to other ranks (False for a world of one)."""
        if self.solo:
            return False
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    @property
    def is_default(self) -> bool:
        """Whether this is the default (world) group, the only one every rank can build a sibling of."""
        return not self.solo and self.group in (None, dist.group.WORLD)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.active else 0

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group) if self.active else 1

    def global_rank(self, group_rank: int) -> int:
        """The default-group rank of ``group_rank`` (what ``dist.gather(dst=...)`` wants)."""
        if not self.active or self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def rank_of_global(self) -> dict[int, int] | None:
        """Global rank -> rank in this group, or None where they are the same (the default group)."""
        if not self.active or self.group in (None, dist.group.WORLD):
            return None
        return {g: i for i, g in enumerate(dist.get_process_group_ranks(self.group))}

    def all_gather_object(self, obj: Any, what: str = "") -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        _talking(what or "exchanging results", lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def broadcast_object(self, obj: Any, src: int = 0, what: str = "") -> Any:
        if not self.active:
            return obj
        box = [obj]
        _talking(
            what or "receiving the master's decision",
            lambda: dist.broadcast_object_list(box, src=self.global_rank(src), group=self.group),
        )
        return box[0]

    def barrier(self, what: str = "") -> None:
        if self.active:
            _talking(what or "waiting for every rank", lambda: dist.barrier(group=self.group))


def _talking(what: str, call: Callable[[], Any]) -> None:
    with peer_failure(what):
        call()


@contextlib.contextmanager
def peer_failure(what: str) -> Iterator[None]:
    """Turn a collective cut off by a dead or hung peer into a :class:`DistributedCheckpointError`.

    The backend's own error (gloo: "Connection reset by peer", or a timeout) says nothing of
    the checkpoint; this one says which step was cut off, and keeps the backend's words.
    """
    try:
        yield
    except DistributedCheckpointError:
        raise
    except RuntimeError as exc:  # DistBackendError and gloo's errors derive from RuntimeError
        text = str(exc).strip()
        first_line = text.splitlines()[0] if text else type(exc).__name__
        raise DistributedCheckpointError(
            f"{what}: lost contact with another rank (it died, or hung past the process group's timeout); "
            f"this step was abandoned and nothing it was writing was committed. Backend said: {first_line}"
        ) from exc


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    value: Any = None
    error: str = ""
    kind: str = ""


def _describe(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    return "".join(lines).strip()


def collective_step(group: Group, name: str, fn: Callable[[], T], *, gather: bool = False) -> Any:
    """Run ``fn`` on every rank; raise one error on all ranks if any rank failed.

    Returns the local result, or (``gather=True``) the list of every rank's result in rank
    order (results must then be picklable). The outcome exchange doubles as a barrier, so
    the step ends together everywhere.
    """
    if not group.active:
        value = fn()
        return [value] if gather else value
    local_exc: BaseException | None = None
    value: Any = None
    try:
        value = fn()
        outcome = _Outcome(True, value if gather else None)
    except Exception as exc:  # noqa: BLE001 (reported to every rank below)
        local_exc = exc
        outcome = _Outcome(False, None, _describe(exc), type(exc).__name__)
    outcomes = group.all_gather_object(outcome, what=name)
    raise_if_failed(group, name, outcomes, local_exc)
    return [o.value for o in outcomes] if gather else value


def gather_distinct(group: Group, name: str, value: Any) -> list[Any]:
    """Every rank's ``value`` (rank order), each distinct value sent once: one exchange of
    digests, then only the first rank holding each value sends it. Ranks holding different keys
    (pipeline stages) have a few distinct key lists among many ranks; gathering each from
    every rank would cost ranks x keys on every rank. Every rank calls it; it catches no local
    failure (call it once a collective step has succeeded on every rank)."""
    if not group.active:
        return [value]
    digest = hashlib.sha1(pickle.dumps(value)).hexdigest()
    digests = group.all_gather_object(digest, what=name)
    first: dict[str, int] = {}
    for rank, d in enumerate(digests):
        first.setdefault(d, rank)
    sent = group.all_gather_object(value if first[digest] == group.rank else None, what=name)
    return [sent[first[d]] for d in digests]


def report_errors(group: Group, name: str, local_error: BaseException | None) -> None:
    """Exchange the outcome of work already done (e.g. a loop of collectives that had to
    keep going after a local failure) and raise on all ranks if any rank failed."""
    if not group.active:
        if local_error is not None:
            raise local_error
        return
    if local_error is None:
        outcome = _Outcome(True)
    else:
        outcome = _Outcome(False, None, _describe(local_error), type(local_error).__name__)
    raise_if_failed(group, name, group.all_gather_object(outcome, what=name), local_error)


def raise_if_failed(group: Group, name: str, outcomes: list[_Outcome], local_exc: BaseException | None) -> None:
    failed = [(r, o) for r, o in enumerate(outcomes) if not o.ok]
    nested = len(failed) == len(outcomes) and all(o.kind == "DistributedCheckpointError" for _, o in failed)
    if nested and len({o.error for _, o in failed}) == 1 and isinstance(local_exc, DistributedCheckpointError):
        raise local_exc  # an inner step already raised the same error on every rank: keep it as is
    if failed:
        details = "; ".join(f"rank {r}: {o.error}" for r, o in failed)
        raise DistributedCheckpointError(f"{name} failed on {len(failed)} of {group.size} ranks: {details}") from (
            local_exc
        )


@dataclass(frozen=True)
class _Verdict:
    ok: bool
    error: str = ""
    kind: str = ""  # the nearest class of ckptio.errors in the exception's MRO, "" for any other exception
    path: str | None = None


def _error_kind(exc: BaseException) -> str:
    from ckptio import errors

    if isinstance(exc, errors.DistributedCheckpointError):
        return ""
    for cls in type(exc).__mro__:
        if getattr(errors, cls.__name__, None) is cls:
            return cls.__name__
    return ""


def agreed_step(group: Group, name: str, fn: Callable[[], T], *, precedence: tuple[type, ...] = ()) -> T:
    """Run a local check ``fn`` on every rank and reach one verdict: if any rank failed, every rank
    raises the same error, whose class says what went wrong (unlike :func:`collective_step`, which
    wraps every failure in :class:`DistributedCheckpointError`).

    The class is the first of ``precedence`` that some rank raised (e.g. ``StateMismatchError``,
    the user's error, over a damaged file on another rank), else the most specific
    ``CheckpointError`` class that every failure shares; a failure that is no ``CheckpointError``
    makes it a ``DistributedCheckpointError``. ``fn`` must not run collectives itself. A world
    of one runs ``fn`` and raises its own exception.
    """
    from ckptio import errors

    if not group.active:
        return fn()
    local_exc: BaseException | None = None
    value: Any = None
    try:
        value = fn()
        verdict = _Verdict(True)
    except Exception as exc:  # noqa: BLE001 (reported to every rank below)
        local_exc = exc
        verdict = _Verdict(False, _describe(exc), _error_kind(exc), getattr(exc, "path", None))
    verdicts = group.all_gather_object(verdict, what=name)
    failed = [(r, v) for r, v in enumerate(verdicts) if not v.ok]
    if not failed:
        return value
    classes = [getattr(errors, v.kind) if v.kind else None for _, v in failed]
    cls: type = errors.DistributedCheckpointError
    preferred = [p for p in precedence if any(c is not None and issubclass(c, p) for c in classes)]
    if preferred:
        cls = preferred[0]
    elif all(c is not None for c in classes):
        cls = next(base for base in classes[0].__mro__ if all(issubclass(c, base) for c in classes))
    details = "; ".join(f"rank {r}: {v.error}" for r, v in failed)
    error = cls(f"{name} failed on {len(failed)} of {group.size} ranks: {details}")
    paths = {v.path for _, v in failed}
    if len(paths) == 1:
        error.path = paths.pop()  # recorded, not repeated: every rank's message already names its file
    raise error from local_exc
