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

Interpreter exit (a script's end, or Ctrl-C: the ``KeyboardInterrupt`` unwinds the main thread
and the interpreter exits) waits from threading's exit hooks, before the interpreter refuses
new thread-pool work (the writer's threads would fail with "cannot schedule new futures after
interpreter shutdown" and the save would be lost). Interrupted while it waits (Ctrl-C again),
exit stops waiting: every write in flight fails at its next piece
(:func:`~ckptio.storage.base.abandon_writes`), so the save aborts on its own thread and removes
its staging folder, and the process ends with the save committed or not there at all, never
killed mid-file. Only a kill leaves a staging folder, which the next save of that path removes.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from ckptio.async_io.priority import lower_thread_priority
from ckptio.async_io.staging import StagingBuffers, StagingProgress
from ckptio.storage.base import abandon_writes

T = TypeVar("T")

_LIVE: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()

#: Priority of the writing half (after the copy, which runs at the loop's priority: the loop may
#: be waiting for it): ``nice`` added and I/O class ("idle", "low" or None). The default leaves
#: the loop's priority: measured on the 2-core reference machine (docs/design.md, "Async rules"),
#: nice 19 + idle I/O did not make the loop faster, and a writer starved by a loop that keeps
#: every core busy was still writing when the next checkpoint came, which then waited for it.
WRITER_NICE = 0
WRITER_IO: str | None = None


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
        # set when the job ends: waited on instead of Thread.join, which on Python 3.11, when
        # interrupted (Ctrl-C), marks a thread that is still running as stopped
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._progress: StagingProgress | None = None
        self._what = ""
        #: the handle of the last save submitted (None before the first)
        self.handle: SaveHandle | None = None
        _LIVE.add(self)

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and not self._done.is_set()

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
        _register_exit_wait()
        handle = handle or SaveHandle(what)
        with self._lock:
            self._wait_locked()
            progress = progress or StagingProgress()
            handle._progress = progress
            self._what, self._progress, self.handle = what, progress, handle
            self._done = threading.Event()
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
        finally:
            self._done.set()

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
            self._done.wait()
            thread.join()  # returns at once: the job is over
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def release_staging(self) -> None:
        """Free the host staging buffers (after :meth:`wait`); the next async save reallocates."""
        self.wait()
        self.staging.release()

    def finish_at_exit(self, abandon_after: float = 30.0) -> None:
        """Wait for the save in flight; report a failure on stderr (exit cannot raise). A
        ``KeyboardInterrupt`` while waiting abandons the save instead (see the module doc)."""
        try:
            self.wait()
            return
        except KeyboardInterrupt:
            abandon_writes()
            print(f"ckptio: interrupted while the async save of {self._what} finished; stopping it, nothing of it "
                  "is committed (the previous checkpoint stays)", file=sys.stderr)  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - exit cannot raise; print it instead
            print(f"ckptio: async save of {self._what} FAILED, the checkpoint was not written:", file=sys.stderr)
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            return
        deadline = time.monotonic() + abandon_after
        while self._thread is not None and not self._done.is_set() and time.monotonic() < deadline:
            try:  # the writer stops at its next piece and removes its staging folder
                self._done.wait(0.1)
            except KeyboardInterrupt:
                continue


def _wait_all_at_exit() -> None:
    """Interpreter exit waits for every save in flight and reports a failed one loudly."""
    for saver in list(_LIVE):
        saver.finish_at_exit()


_exit_wait_registered = False


def _register_exit_wait() -> None:
    """Hook exit's wait into threading's shutdown, ahead of ``concurrent.futures``' own hook
    (hooks run last-registered first; the engine's thread pool module is imported by now).
    ``atexit`` alone would run only after the interpreter stopped thread pools and joined
    threads; it is registered too, for when a Ctrl-C pressed as exit begins skips threading's
    hooks (the threads are then still running, and thread pools still take work)."""
    global _exit_wait_registered
    if _exit_wait_registered:
        return
    import concurrent.futures.thread  # noqa: F401 (registers its hook first, so ours runs before it)

    register = getattr(threading, "_register_atexit", None)
    with contextlib.suppress(RuntimeError):  # already shutting down: atexit below still waits
        if register is not None:
            register(_wait_all_at_exit)
    atexit.register(_wait_all_at_exit)  # a no-op when the hook above already waited
    _exit_wait_registered = True
