"""Lower the CPU and I/O priority of the calling thread (Linux; elsewhere a no-op).

An option for the background writer (``ckptio.async_io.writer.WRITER_NICE`` / ``WRITER_IO``):
at a lower priority than the training loop, the writer's formatting, hashing and page-cache
copies take only the cycles the loop leaves idle. Off by default: on a machine whose cores the
loop keeps busy the writer then falls behind, and the next checkpoint waits for it
(docs/design.md, "Async rules": measured).
On Linux ``setpriority`` and ``ioprio_set`` address one thread by its id, and threads the writer
starts inherit both. A process can lower its priority but not raise it back without privilege,
so only a thread that ends with the save calls this (the saver starts a thread per save).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

IOPRIO_CLASS_BE, IOPRIO_CLASS_IDLE = 2, 3
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_SHIFT = 13
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "ppc64le": 273, "s390x": 282}.get(platform.machine())
_IO_CLASSES = {"idle": (IOPRIO_CLASS_IDLE, 0), "low": (IOPRIO_CLASS_BE, 7)}


def lower_thread_priority(nice: int = 0, io: str | None = None) -> dict[str, object]:
    """Add ``nice`` to this thread's nice value, and (``io``: "idle" or "low") lower its I/O class.

    Returns what was applied (for the benchmark's record); failures are ignored: a lower priority
    is an optimisation, never a reason to fail a save.
    """
    applied: dict[str, object] = {}
    tid = threading.get_native_id()
    if nice > 0 and hasattr(os, "setpriority"):
        try:
            now = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, now + nice))
            applied["nice"] = os.getpriority(os.PRIO_PROCESS, tid)
        except OSError:
            pass
    if io is not None and _SYS_IOPRIO_SET is not None:
        klass, data = _IO_CLASSES[io]
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            value = (klass << _IOPRIO_CLASS_SHIFT) | data
            if libc.syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, tid, value) == 0:
                applied["io"] = io
        except (OSError, AttributeError):
            pass
    return applied
