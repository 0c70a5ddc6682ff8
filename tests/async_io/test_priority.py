"""The writer's priority option lowers its own thread only, never the training loop's."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from ckptio.async_io.priority import lower_thread_priority


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_lowering_the_writer_thread_leaves_the_calling_thread_as_it_was():
    loop_tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, loop_tid)
    seen = {}

    def writer():
        tid = threading.get_native_id()
        seen["applied"] = lower_thread_priority(5, "idle")
        seen["writer"] = os.getpriority(os.PRIO_PROCESS, tid)

    t = threading.Thread(target=writer)
    t.start()
    t.join()
    assert seen["writer"] == min(19, before + 5) and seen["applied"]["nice"] == seen["writer"]
    assert os.getpriority(os.PRIO_PROCESS, loop_tid) == before


def test_the_default_writer_keeps_the_loops_priority():
    from ckptio.async_io import writer

    # measured (docs/design.md, "Async rules"): a niced writer fell behind a loop that kept every core busy
    assert (writer.WRITER_NICE, writer.WRITER_IO) == (0, None)
    assert lower_thread_priority(0, None) == {}
