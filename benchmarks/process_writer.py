"""A persistent writer *process* for ckptio, with shared-memory staging: the variant of the async
writer that docs/design.md ("The writer") measures against the library's writer thread.

It mirrors DCP's ``AsyncCheckpointerType.PROCESS`` on ckptio's engine: one process, spawned once,
holds the staging buffers in shared memory (``share_memory_()``, handed over once through a pipe
as file descriptors); each save copies the live tensors into them on a background thread of the
training process (``memmove``, as the library does), then tells the writer process to write them:
the same ``TensorPart`` s and ``save_parts`` commit as the library's training checkpoint (model
shards under ``modeling/``, optimizer shards under ``optimizer/``; not the small JSON files). The
loop waits for the copy before ``optimizer.step()`` (``before_step``), as the library's guard
does. World of one only (a process group of the writers' own would be needed for several ranks).
"""

from __future__ import annotations

import ctypes
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _child(conn, nice: int, io: str | None, shard_bytes: int) -> None:
    from ckptio.async_io.priority import lower_thread_priority
    from ckptio.engine.group import Group
    from ckptio.engine.save import TensorPart, save_parts
    from ckptio.layouts.model import ModelSaveOptions, model_metadata
    from ckptio.layouts.optimizer import OptimizerSaveOptions

    torch.set_num_threads(1)
    lower_thread_priority(nice, io)  # this process's main thread; the write threads inherit it
    buffers: dict[str, dict[str, torch.Tensor]] = {}
    group = Group.of_one()
    model_opts = ModelSaveOptions(True, None, shard_bytes, True)
    optim_opts = OptimizerSaveOptions(True, None, shard_bytes, "ckptio", "safetensors")
    while True:
        message = conn.recv()
        if message is None:
            return
        kind, value = message
        if kind == "buffers":
            buffers = value
            conn.send(("ok", None))
            continue
        try:
            path = str(value)
            parts = [
                TensorPart(buffers["model"], model_opts.write_spec(path), group, subdir="modeling",
                           metadata=model_metadata(model_opts, {}), slot="model"),
                TensorPart(buffers["optimizer"], optim_opts.write_spec(), group, subdir="optimizer", slot="optimizer"),
            ]  # fmt: skip
            save_parts(path, parts, group, folder=True)
            conn.send(("ok", None))
        except Exception as exc:  # noqa: BLE001 (reported to the training process)
            conn.send(("error", repr(exc)))


class ProcessWriter:
    """``save(model_state, optimizer_state, path)`` returns at once; ``before_step()`` waits for the
    copy; ``wait()`` for the checkpoint to be durable (raising the writer's error)."""

    def __init__(self, *, nice: int = 0, io: str | None = None, shard_bytes: int = 1024**3) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child, nice, io, shard_bytes), daemon=True)
        self._proc.start()
        child.close()
        self._buffers: dict[str, dict[str, torch.Tensor]] | None = None
        self._staged = threading.Event()
        self._staged.set()
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def _allocate(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        self._buffers = {
            slot: {k: torch.empty(t.shape, dtype=t.dtype).share_memory_() for k, t in state.items()}
            for slot, state in states.items()
        }
        self._conn.send(("buffers", self._buffers))
        assert self._conn.recv()[0] == "ok"

    def save(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, torch.Tensor], path: Path) -> None:
        self.wait()
        states = {"model": model_state, "optimizer": optimizer_state}
        if self._buffers is None:
            self._allocate(states)
        pairs = [(self._buffers[slot][k], t.detach()) for slot, state in states.items() for k, t in state.items()]
        self._staged.clear()
        self._thread = threading.Thread(target=self._run, args=(pairs, path), daemon=True)
        self._thread.start()

    def _run(self, pairs, path: Path) -> None:
        try:
            for dest, src in pairs:
                if src.is_contiguous() and src.device.type == "cpu":
                    ctypes.memmove(dest.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
                else:
                    dest.copy_(src)
        finally:
            self._staged.set()
        self._conn.send(("write", str(path)))
        status, error = self._conn.recv()
        if status != "ok":
            self._error = error

    def before_step(self) -> float:
        start = time.perf_counter()
        self._staged.wait()
        return time.perf_counter() - start

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"process writer failed: {error}")

    def close(self) -> None:
        self.wait()
        self._conn.send(None)
        self._proc.join(30)
