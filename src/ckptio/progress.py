"""Progress bars for long saves, loads, uploads and conversions (bytes and files).

A bar appears only when all hold: stderr is a terminal, this process is the master (rank 0,
from ``torch.distributed`` or the ``RANK`` variable), the caller did not pass ``quiet=True``
and ``CKPTIO_PROGRESS`` is not ``0``. It appears only after about a second (``tqdm``'s
``delay``), so quick operations print nothing. Updates are per chunk (8 MiB or a shard) and
tqdm redraws at most 10 times a second, so the cost is a few attribute updates per chunk.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator

DELAY_S = 1.0


def _is_master() -> bool:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except Exception:  # pragma: no cover - torch without distributed
        pass
    return os.environ.get("RANK", "0") == "0"


def progress_enabled(quiet: bool = False) -> bool:
    """Whether a bar would be shown here (terminal, master rank, not turned off)."""
    if quiet or os.environ.get("CKPTIO_PROGRESS", "1") == "0":
        return False
    try:
        if not sys.stderr.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    return _is_master()


class Progress:
    """A byte-counting bar that also counts files; a no-op object when bars are off."""

    def __init__(self, desc: str, total_bytes: int, total_files: int | None, *, quiet: bool = False) -> None:
        self.total_files = total_files
        self.files = 0
        self._bar = None
        if progress_enabled(quiet):
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                return
            self._bar = tqdm(
                total=total_bytes,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                delay=DELAY_S,
                leave=False,
                file=sys.stderr,
                postfix=f"files 0/{total_files}" if total_files else None,
            )

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def file_done(self) -> None:
        self.files += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"files {self.files}/{self.total_files}", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_PROC_IO = "/proc/self/io"
POLL_S = 0.25


def _io_counter(key: str) -> int | None:
    try:
        with open(_PROC_IO, "rb") as fh:
            for line in fh:
                name, _, value = line.partition(b":")
                if name.decode() == key:
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


@contextlib.contextmanager
def track_io(
    desc: str, total_bytes: int | Callable[[], int], *, direction: str = "write", quiet: bool = False
) -> Iterator[None]:
    """A bar for a whole save or load, fed by the process's I/O counters (Linux ``/proc/self/io``).

    Nothing is added to the I/O path itself: a daemon thread reads the kernel's count of bytes
    written (``wchar``) or read (``rchar``) four times a second. Where bars are off, or there is
    no ``/proc``, no thread is started at all.
    """
    key = "wchar" if direction == "write" else "rchar"
    start = _io_counter(key) if progress_enabled(quiet) else None
    if start is not None and callable(total_bytes):
        total_bytes = total_bytes()
    if start is not None and total_bytes <= 0:
        start = None
    if start is None:
        yield
        return
    stop = threading.Event()
    with Progress(desc, total_bytes, None, quiet=quiet) as bar:

        def poll() -> None:
            shown = 0
            while not stop.wait(POLL_S):
                now = _io_counter(key)
                if now is None:
                    return
                done = min(max(now - start, 0), total_bytes)
                bar.advance(done - shown)
                shown = done

        thread = threading.Thread(target=poll, name="ckptio-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def module_nbytes(module) -> int:
    """Bytes of a module's parameters and buffers (the size of its checkpoint), without collectives."""
    try:
        tensors = [*module.parameters(), *module.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)
    except Exception:  # an exotic module: no bar rather than a failed save
        return 0
