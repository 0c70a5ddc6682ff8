"""The background writer behind ``use_async=True``.

A save is split in two, and both halves run on one background thread per save: ``stage_fn``
copies the state into reusable host buffers (:mod:`ckptio.async_io.staging`) while the training
loop goes on (the boosted optimizer's ``step()`` and the boosted model's forward wait, through
:class:`~ckptio.async_io.staging.StagingProgress`, only for the copies of what they modify), then
``write_fn`` formats, writes and commits the staged copy at a lower CPU and I/O priority
(:mod:`ckptio.async_io.priority`; docs/design.md gives the measurements). The commit is the last
step of ``write_fn``, so a checkpoint becomes visible only once every byte is durable; a failing
``write_fn`` aborts its staging folder and the previous checkpoint stays.

Rules (design.md, "Async rules"): at most one save per :class:`AsyncSaver` is in flight; the
next :meth:`submit`, :meth:`wait` and interpreter exit wait for it; an error raised by the
background thread is re-raised by the next of those (once), never dropped. Each save's
:class:`SaveHandle` also reports it, as often as it is asked.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from ckptio.async_io.priority import lower_thread_priority
from ckptio.async_io.staging import StagingBuffers, StagingProgress

T = TypeVar("T")

_LIVE: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()

#: Priority of the writing half (after the copy, which runs at the loop's priority: the loop may
#: be waiting for it). Measured on the 2-core reference machine: docs/design.md, "The writer".
WRITER_NICE = 19
WRITER_IO = "idle"


class Completion:
    """One completion of a save (its snapshot staged, or the checkpoint durable), like a future:
    :meth:`wait` / :meth:`result` block until it happened and raise the save's error if it failed."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._error: BaseException | None = None
        self.seconds: float | None = None  # from the call to this completion

    def _set(self, started: float, error: BaseException | None = None) -> None:
        if not self._event.is_set():
            self._error = error
            self.seconds = time.perf_counter() - started
            self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> None:
        """Block until done (``TimeoutError`` after ``timeout`` seconds); raise the save's error if it failed."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"not done after {timeout} s")
        if self._error is not None:
            raise self._error

    wait = result


class SaveHandle:
    """What a save call returns: ``staged`` (the live state may change: the snapshot is taken) and
    ``durable`` (the checkpoint is committed), each with ``wait()`` / ``result()`` / ``done()``.

    ``blocked_seconds`` is the time the training loop spent on this save: the call itself plus
    the waits of the boosted optimizer, the boosted model and ``wait_staged()`` for its copies.
    A synchronous save's handle is complete when the call returns.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.staged = Completion()
        self.durable = Completion()
        self.call_seconds = 0.0
        self._started = time.perf_counter()
        self._progress: StagingProgress | None = None

    @classmethod
    def completed(cls, what: str) -> SaveHandle:
        handle = cls(what)
        handle.call_seconds = time.perf_counter() - handle._started
        handle.staged._set(handle._started)
        handle.durable._set(handle._started)
        return handle

    @property
    def blocked_seconds(self) -> float:
        waited = self._progress.waited if self._progress is not None else 0.0
        return self.call_seconds + waited

    def __repr__(self) -> str:
        state = "durable" if self.durable.done() else "staged" if self.staged.done() else "staging"
        return f"<SaveHandle {self.what}: {state}>"


class AsyncSaver:
    """Runs one save at a time in the background, on staged (snapshotted) state."""

    def __init__(self, staging: StagingBuffers | None = None) -> None:
        self.staging = staging or StagingBuffers()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._progress: StagingProgress | None = None
        self._what = ""
        #: the handle of the last save submitted (None before the first)
        self.handle: SaveHandle | None = None
        _LIVE.add(self)

    @property
    def in_flight(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def submit(
        self,
        stage_fn: Callable[[StagingBuffers], T],
        write_fn: Callable[[T], Any],
        *,
        what: str = "checkpoint",
        progress: StagingProgress | None = None,
        handle: SaveHandle | None = None,
    ) -> SaveHandle:
        """Wait for the previous save, then stage (``stage_fn``, reporting to ``progress``) and
        write (``write_fn``) on a background thread; return at once.

        Raises the previous save's error, if it failed, before starting anything new.
        """
        handle = handle or SaveHandle(what)
        with self._lock:
            self._wait_locked()
            progress = progress or StagingProgress()
            handle._progress = progress
            self._what, self._progress, self.handle = what, progress, handle
            self._thread = threading.Thread(
                target=self._run,
                args=(stage_fn, write_fn, progress, handle),
                name=f"ckptio-async-save[{what}]",
                daemon=False,
            )
            self._thread.start()
            handle.call_seconds = time.perf_counter() - handle._started
        return handle

    def _run(self, stage_fn, write_fn, progress: StagingProgress, handle: SaveHandle) -> None:
        try:
            try:
                payload = stage_fn(self.staging)
            finally:
                progress.finish()  # failed or not, nothing reads the live state any more
            handle.staged._set(handle._started)
            lower_thread_priority(WRITER_NICE, WRITER_IO)
            write_fn(payload)
            handle.durable._set(handle._started)
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised on the caller's thread
            self._error = exc
            handle.staged._set(handle._started, exc)
            handle.durable._set(handle._started, exc)

    def wait_staged(self, obj: object = None) -> float:
        """Block until the save in flight has copied what ``obj`` (a boosted model or optimizer)
        is about to modify, or (``obj`` None) all of its state; returns the seconds waited. Never
        raises: a failed save's error comes from the next save or :meth:`wait`."""
        progress = self._progress
        if progress is None or progress.finished:
            return 0.0
        return progress.wait(obj)

    def wait(self) -> None:
        """Block until the save in flight is durable (or failed); re-raise its error once."""
        with self._lock:
            self._wait_locked()

    def _wait_locked(self) -> None:
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def release_staging(self) -> None:
        """Free the host staging buffers (after :meth:`wait`); the next async save reallocates."""
        self.wait()
        self.staging.release()


@atexit.register
def _wait_all_at_exit() -> None:
    """Interpreter exit waits for every save in flight and reports a failed one loudly."""
    for saver in list(_LIVE):
        try:
            saver.wait()
        except BaseException as exc:  # noqa: BLE001 - exit cannot raise; print it instead
            print(f"ckptio: async save of {saver._what} FAILED, the checkpoint was not written:", file=sys.stderr)
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
