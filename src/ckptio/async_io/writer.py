"""The background writer behind ``use_async=True``.

A save is split in two: ``stage_fn`` copies the state into reusable host buffers while the
caller waits (so training may change the weights the moment the call returns), and
``write_fn`` formats, writes and commits the staged copy on a background thread. The commit
is the last step of ``write_fn``, so a checkpoint becomes visible only once every byte is
durable; a failing ``write_fn`` aborts its staging folder and the previous checkpoint stays.

Rules (design.md, "Async rules"): at most one save per :class:`AsyncSaver` is in flight; the
next :meth:`submit`, :meth:`wait` and interpreter exit wait for it; an error raised by the
writer is re-raised by the next of those (once), never dropped.
"""

from __future__ import annotations

import atexit
import sys
import threading
import traceback
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from ckptio.async_io.staging import StagingBuffers

T = TypeVar("T")

_LIVE: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()


class AsyncSaver:
    """Runs one save at a time in the background, on staged (snapshotted) state."""

    def __init__(self, staging: StagingBuffers | None = None) -> None:
        self.staging = staging or StagingBuffers()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""
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
    ) -> None:
        """Wait for the previous save, stage synchronously, then run ``write_fn`` in the background.

        Raises the previous save's error, if it failed, before starting anything new.
        """
        with self._lock:
            self._wait_locked()
            payload = stage_fn(self.staging)
            self._what = what
            self._thread = threading.Thread(
                target=self._run, args=(write_fn, payload), name=f"ckptio-async-save[{what}]", daemon=False
            )
            self._thread.start()

    def _run(self, write_fn: Callable[[Any], Any], payload: Any) -> None:
        try:
            write_fn(payload)
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised on the caller's thread
            self._error = exc

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
