"""Host staging buffers: a snapshot of the state that training may overwrite right after.

An async save copies every tensor into host memory owned by ckptio, then returns; the
background writer streams those copies to disk. The buffers are kept and reused by the
next save, because allocating (and first-touching) fresh memory costs far more than the
copy itself: reusing an existing buffer copies at memory speed, while new pages are paid
for in page faults on every save.

Memory bound: per *slot* (``"model"``, ``"optimizer"``, ...) exactly one host copy of the
tensors of the last state staged in that slot, no more: an async model save keeps one extra
copy of the model's saved tensors alive until :meth:`StagingBuffers.release`. A buffer is
reused when the tensor at the same position has the same dtype and shape (the usual case:
the same model saved again); otherwise it is dropped and a new one allocated. Each tensor
gets its own buffer, never a view into a shared one, because ``torch.save`` writes a view's
whole underlying storage. Buffers are pinned (page-locked) when CUDA is available, so
device-to-host copies run at full speed on a side stream.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Mapping
from typing import Any

import torch


def _is_plain_tensor(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor) and obj.device.type != "meta"


class StagingBuffers:
    """Reusable host copies of tensors: per slot, one buffer per tensor position.

    Not thread-safe across concurrent ``stage`` calls on the same slot: the async writer
    guarantees that the previous save has finished with a slot before it is staged again.
    """

    def __init__(self, pin_memory: bool | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._buffers: dict[str, list[torch.Tensor]] = {}
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

    def stage(self, tensors: Mapping[str, torch.Tensor], slot: str = "default") -> dict[str, torch.Tensor]:
        """Copy ``tensors`` (any device, any layout) into the slot; return contiguous CPU copies by name."""
        return self.stage_tree(dict(tensors), slot)

    def stage_tree(self, tree: Any, slot: str = "default") -> Any:
        """Copy every tensor inside nested dicts / lists / tuples into the slot.

        Containers are rebuilt and other leaves deep-copied, so a later change to the live
        structure (an LR written into ``param_groups``, a new state entry) cannot reach the
        snapshot. A tensor object that appears twice is staged once and stays shared.
        """
        tensors: dict[int, torch.Tensor] = {}
        _collect(tree, tensors)
        bufs = self._buffers_for(slot, list(tensors.values()))
        copies: dict[int, torch.Tensor] = {}
        stream = None
        if any(t.device.type == "cuda" for t in tensors.values()):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for (key, t), dest in zip(tensors.items(), bufs):
                dest.copy_(t.detach(), non_blocking=stream is not None)
                copies[key] = dest
        if stream is not None:
            stream.synchronize()  # the call returns only once the snapshot is complete
        return _rebuild(tree, copies)


def _collect(obj: Any, out: dict[int, torch.Tensor]) -> None:
    if _is_plain_tensor(obj):
        out.setdefault(id(obj), obj)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            _collect(value, out)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _collect(value, out)


def _rebuild(obj: Any, copies: dict[int, torch.Tensor]) -> Any:
    if _is_plain_tensor(obj):
        return copies[id(obj)]
    if isinstance(obj, Mapping):
        items = {k: _rebuild(v, copies) for k, v in obj.items()}
        return type(obj)(items) if isinstance(obj, dict) and type(obj) is not dict else items
    if isinstance(obj, list):
        return [_rebuild(v, copies) for v in obj]
    if isinstance(obj, tuple):
        items = [_rebuild(v, copies) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return copy.deepcopy(obj)
