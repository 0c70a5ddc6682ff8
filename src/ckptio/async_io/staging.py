"""Host staging buffers, and the copy of the live state into them behind the training loop's back.

An async save's call only *asks* for a snapshot (:class:`Snapshot`: references to the live
tensors, their version counters, and on CUDA an event on the caller's stream) and returns. The
saver's thread then copies the tensors into host memory owned by ckptio
(:meth:`StagingBuffers.copy`) while the loop computes its next forward and backward, and the
writer streams those copies to disk. Until a tensor is copied, whoever is about to modify it
waits: the boosted optimizer's ``step()`` for its parameters and state, the boosted model's
forward for its buffers (:class:`StagingOrder` copies those first, :class:`StagingProgress`
says how far the copy is). Anything else that changes the state in place must call
``booster.wait_staged()`` first; a change the version counters reveal before its tensor was
copied fails the save (:class:`~ckptio.errors.StateChangedError`) instead of writing a later
state than the call's.

The buffers are kept and reused by the next save, because allocating (and first-touching)
fresh memory costs far more than the copy itself: reusing an existing buffer copies at memory
speed, while new pages are paid for in page faults on every save. A CPU tensor is copied with
one ``memmove`` on the saver's thread (measured: torch's ``copy_`` from a second thread starts
its own OpenMP team, which on a 2-core machine takes both cores from the training loop).

Memory bound: per *slot* (``"model"``, ``"optimizer"``, ...) exactly one host copy of the
tensors of the last state staged in that slot, no more: an async model save keeps one extra
copy of the model's saved tensors alive until :meth:`StagingBuffers.release`. A buffer is
reused when the tensor at the same position has the same dtype and shape (the usual case:
the same model saved again); otherwise it is dropped and a new one allocated. Each tensor
gets its own buffer, never a view into a shared one, because ``torch.save`` writes a view's
whole underlying storage.

CUDA: buffers are pinned (page-locked) and device-to-host copies run on one reused side stream
per device, ordered after the work the caller's stream had queued at the call (an event), so the
snapshot is the state at the call even when the optimizer step before it is still running on
the GPU. A hook that waits for a group makes its own stream wait for that group's event on the
GPU: the CPU waits only until the copies are queued.
"""

from __future__ import annotations

import copy
import ctypes
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptio.errors import StateChangedError


def _is_plain_tensor(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor) and obj.device.type != "meta"


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's tensor behind ``t`` (a DTensor's local shard), without recording autograd."""
    inner = getattr(t, "_local_tensor", None)
    return inner if isinstance(inner, torch.Tensor) else t


def storage_key(t: torch.Tensor) -> int:
    """Which memory ``t`` lives in: tensors sharing it (views, a parameter and its ``.detach()``)
    share the key."""
    try:
        return local_tensor(t).untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. functional wrappers)
        return id(t)


def version_of(t: torch.Tensor) -> int | None:
    """The version counter of ``t`` (bumped by every in-place op), None where it has none."""
    try:
        return local_tensor(t)._version
    except (RuntimeError, AttributeError):  # inference tensors keep no version counter
        return None


@dataclass
class Snapshot:
    """What one part asks to have copied, taken in the caller's thread: the live tensors by
    key (in a stable order: the slot's buffers are matched by position), their version counters,
    and for CUDA tensors an event on the caller's stream at the moment of the call."""

    slot: str
    tensors: dict[Any, torch.Tensor]
    versions: dict[Any, int | None] = field(default_factory=dict)
    ready: dict[torch.device, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, slot: str, tensors: Mapping[Any, torch.Tensor]) -> Snapshot:
        live = {k: local_tensor(t).detach() for k, t in tensors.items()}
        ready = {}
        for device in {t.device for t in live.values() if t.device.type == "cuda"}:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            ready[device] = event
        return cls(slot, live, {k: version_of(t) for k, t in live.items()}, ready)


class StagingOrder:
    """The order of an async save's copies: per guarded object a group of the tensors it is about
    to modify (a boosted model's buffers, which its forward may update, then each boosted
    optimizer's parameters and state), then everything else. The hook of an object waits for its
    group and the groups before it; a tensor is in the first group that names its memory."""

    def __init__(self, guards: Iterable[tuple[object, Iterable[torch.Tensor]]] = ()) -> None:
        self.group_of_object: dict[int, int] = {}
        self._group_of_key: dict[int, int] = {}
        for index, (obj, tensors) in enumerate(guards):
            self.group_of_object[id(obj)] = index
            for t in tensors:
                self._group_of_key.setdefault(storage_key(t), index)
        self.rest = len(self.group_of_object)

    def group(self, t: torch.Tensor) -> int:
        return self._group_of_key.get(storage_key(t), self.rest)


class StagingProgress:
    """How far one save's copies have come: groups complete in order. ``finish()`` (success or
    failure) releases every waiter: after it, nothing of this save reads the live state."""

    def __init__(self, order: StagingOrder | None = None) -> None:
        self.order = order or StagingOrder()
        self._cond = threading.Condition()
        self._done = -1
        self._events: dict[int, list] = {}
        self.finished = False
        self.waited = 0.0  # seconds callers spent blocked here

    def group_done(self, index: int, events: list | None = None) -> None:
        with self._cond:
            self._done = max(self._done, index)
            if events:
                self._events[index] = events
            self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self.finished = True
            self._cond.notify_all()

    def wait(self, obj: object = None) -> float:
        """Block until the tensors ``obj`` (a guarded model or optimizer) is about to modify are
        copied, or (``obj`` None, or an object this save does not know) until every copy is done;
        returns the seconds spent waiting."""
        if self.finished:
            return 0.0
        index = self.order.group_of_object.get(id(obj)) if obj is not None else None
        start = time.perf_counter()
        with self._cond:
            if index is None:
                self._cond.wait_for(lambda: self.finished)
                events = []
            else:
                self._cond.wait_for(lambda: self.finished or self._done >= index)
                events = [] if self.finished else self._events.get(self._latest_event_group(index), [])
        for device, event in events:  # GPU-side: this stream waits for the copies, the CPU goes on
            torch.cuda.current_stream(device).wait_event(event)
        waited = time.perf_counter() - start
        self.waited += waited
        return waited

    def _latest_event_group(self, index: int) -> int:
        """The last group up to ``index`` that recorded events (copies of one stream run in order)."""
        return max((i for i in self._events if i <= index), default=-1)


try:
    _memmove = ctypes.memmove  # a foreign call: the GIL is released while it copies
except AttributeError:  # pragma: no cover
    _memmove = None


def _copy(dest: torch.Tensor, src: torch.Tensor, stream) -> None:
    if (
        stream is None
        and _memmove is not None
        and src.device.type == "cpu"
        and src.layout == torch.strided
        and src.dtype == dest.dtype
        and src.is_contiguous()
        and not src.is_conj()
        and not src.is_neg()
    ):
        nbytes = src.numel() * src.element_size()
        if nbytes:
            _memmove(dest.data_ptr(), src.data_ptr(), nbytes)
        return
    if stream is not None and src.device.type == "cuda":
        src.record_stream(stream)  # the allocator keeps its memory until the side stream is done with it
        with torch.cuda.stream(stream):
            dest.copy_(src, non_blocking=True)
    else:
        dest.copy_(src)


class StagingBuffers:
    """Reusable host copies of tensors: per slot, one buffer per tensor position.

    Not thread-safe across concurrent copies into the same slot: the async writer guarantees
    that the previous save has finished with a slot before it is staged again.
    """

    def __init__(self, pin_memory: bool | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._buffers: dict[str, list[torch.Tensor]] = {}
        self._streams: dict[torch.device, Any] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Host bytes held by all slots (the documented memory bound is this number)."""
        return sum(b.numel() * b.element_size() for bufs in self._buffers.values() for b in bufs)

    def release(self, slot: str | None = None) -> None:
        """Free one slot's buffer (or all); the next save allocates again."""
        with self._lock:
            if slot is None:
                self._buffers.clear()
            else:
                self._buffers.pop(slot, None)

    def _buffers_for(self, slot: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        with self._lock:
            old = self._buffers.pop(slot, [])
            keep = [
                old[i] if i < len(old) and old[i].dtype == t.dtype and old[i].shape == t.shape else None
                for i, t in enumerate(tensors)
            ]
            del old  # buffers that do not fit are freed before new ones are allocated
            bufs = [
                b if b is not None else torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin_memory)
                for b, t in zip(keep, tensors)
            ]
            self._buffers[slot] = bufs
            return bufs

    def _stream(self, device: torch.device):
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        return stream

    def copy(self, snapshots: list[Snapshot], progress: StagingProgress | None = None) -> list[dict[Any, torch.Tensor]]:
        """Copy every snapshot's tensors into its slot, group by group of ``progress.order``;
        return each snapshot's copies by key. Raises :class:`StateChangedError` if a tensor was
        modified in place between the call and its copy (its version counter moved)."""
        progress = progress or StagingProgress()
        jobs = []
        copies: list[dict[Any, torch.Tensor]] = []
        for snap in snapshots:
            bufs = self._buffers_for(snap.slot, list(snap.tensors.values()))
            copies.append(dict(zip(snap.tensors, bufs)))
            for (key, src), dest in zip(snap.tensors.items(), bufs):
                jobs.append((progress.order.group(src), snap, key, src, dest))
        jobs.sort(key=lambda job: job[0])  # stable: within a group, the parts' own order
        streams: dict[torch.device, Any] = {}
        for snap in snapshots:
            for device, event in snap.ready.items():
                if device not in streams:
                    streams[device] = self._stream(device)
                streams[device].wait_event(event)  # after what the caller's stream had queued at the call
        with torch.no_grad():
            for index, group in itertools.groupby(jobs, key=lambda job: job[0]):
                progress.group_done(index - 1)  # every earlier group, empty ones included, is copied
                for _, snap, key, src, dest in group:
                    _copy(dest, src, streams.get(src.device))
                    before = snap.versions.get(key)
                    if before is not None and version_of(src) != before:
                        raise StateChangedError(
                            f"{key!r} ({snap.slot}) was modified in place after the async save was called and "
                            "before it was copied, so the checkpoint would not hold the state of the call; "
                            "call booster.wait_staged() before changing the state outside the boosted "
                            "optimizer's step() and the boosted model's forward"
                        )
                progress.group_done(index, [(device, s.record_event()) for device, s in streams.items()])
        for stream in streams.values():
            stream.synchronize()  # the writer reads the buffers next
        return copies

    def stage(self, tensors: Mapping[str, torch.Tensor], slot: str = "default") -> dict[str, torch.Tensor]:
        """Copy ``tensors`` (any device, any layout) into the slot now; return contiguous CPU copies by name."""
        return self.stage_tree(dict(tensors), slot)

    def stage_tree(self, tree: Any, slot: str = "default") -> Any:
        """Copy every tensor inside nested dicts / lists / tuples into the slot, now.

        Containers are rebuilt and other leaves deep-copied, so a later change to the live
        structure (an LR written into ``param_groups``, a new state entry) cannot reach the
        snapshot. A tensor object that appears twice is staged once and stays shared.
        """
        tree, snapshot = tree_snapshot(tree, slot)
        (copies,) = self.copy([snapshot])
        return rebuild_tree(tree, copies)


def tree_snapshot(tree: Any, slot: str) -> tuple[Any, Snapshot]:
    """``tree`` with its containers rebuilt and other leaves deep-copied now (the tensors still the
    live ones), and the snapshot of its tensors: what a background copy of a nested state needs
    from the call."""
    tensors: dict[int, torch.Tensor] = {}
    _collect(tree, tensors)
    frozen = _rebuild(tree, lambda t: t)
    return frozen, Snapshot.of(slot, tensors)


def rebuild_tree(tree: Any, copies: Mapping[int, torch.Tensor]) -> Any:
    """``tree`` (from :func:`tree_snapshot`) with each tensor replaced by its copy."""
    return _rebuild(tree, lambda t: copies[id(t)])


def _collect(obj: Any, out: dict[int, torch.Tensor]) -> None:
    if _is_plain_tensor(obj):
        out.setdefault(id(obj), obj)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            _collect(value, out)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _collect(value, out)


def _rebuild(obj: Any, tensor: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if _is_plain_tensor(obj):
        return tensor(obj)
    if isinstance(obj, Mapping):
        items = {k: _rebuild(v, tensor) for k, v in obj.items()}
        return type(obj)(items) if isinstance(obj, dict) and type(obj) is not dict else items
    if isinstance(obj, list):
        return [_rebuild(v, tensor) for v in obj]
    if isinstance(obj, tuple):
        items = [_rebuild(v, tensor) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return copy.deepcopy(obj)
