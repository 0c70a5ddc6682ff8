"""Multi-rank test harness: real processes, gloo on 127.0.0.1, rendezvous that cannot collide.

``run_ranks(scenario, nprocs, tmp_path)`` forks ``nprocs`` workers (forking is ~0.1 s a
process, spawning ~4 s; it happens before any process group exists) and runs
``scenario(ctx)`` in each. A scenario runs several phases, each on a fresh process group of
any size up to ``nprocs`` (``ctx.phase(world_size, name, fn)``): e.g. save on 4 ranks, then
load on 2, 1 and 3, all inside one forked group. Rendezvous is a ``file://`` store in
``tmp_path`` (unique per test and phase), every collective has a 60 s timeout, and each
worker reports its result or its traceback to the parent through a queue, which is what the
test judges (not only exit codes). Workers that hang are killed after ``timeout``.
"""

from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = timedelta(seconds=60)


@dataclass
class RankContext:
    """What a worker knows: its rank among the forked processes and a shared folder."""

    rank: int
    nprocs: int
    workdir: Path

    def phase(self, world_size: int, name: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on ranks ``0..world_size-1`` inside a fresh default process group.

        Other ranks skip it (returning None). ``world_size == 1`` still gets a group of one,
        so plugins behave as under ``torchrun --nproc_per_node 1``.
        """
        if self.rank >= world_size:
            return None
        store = self.workdir / f"rendezvous-{name}"
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=self.rank,
            world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )
        try:
            result = fn()
            dist.barrier()
            return result
        finally:
            dist.destroy_process_group()


def _worker(scenario, rank: int, nprocs: int, workdir: Path, results) -> None:
    try:
        if os.path.isdir("/sys/class/net/lo"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo stays on 127.0.0.1
        torch.set_num_threads(1)
        value = scenario(RankContext(rank, nprocs, workdir))
        # Plain pickle, by value: torch's queue reducers would share tensor memory through
        # file descriptors that die with this process.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 (reported to the parent)
        results.put((rank, False, traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()  # the message is in the pipe before we leave
        # Skip interpreter teardown: a rare abort at exit must not mask the reported result.
        os._exit(0)


def run_ranks(scenario: Callable[[RankContext], Any], nprocs: int, tmp_path: Path, timeout: float = 150) -> list:
    """Fork ``nprocs`` workers running ``scenario``; return their results in rank order.

    Raises AssertionError with every failing rank's traceback, or naming the ranks that
    neither reported nor finished within ``timeout`` seconds.
    """
    if dist.is_initialized():
        raise RuntimeError("run_ranks must fork before the parent has a process group")
    workdir = Path(tmp_path) / f"ranks-{time.monotonic_ns()}"
    workdir.mkdir(parents=True)
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(scenario, r, nprocs, workdir, results)) for r in range(nprocs)]
    for p in procs:
        p.start()
    reports: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(reports) < nprocs and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=0.5)
                reports[rank] = (ok, pickle.loads(value) if ok else value)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in reports]
                if dead:
                    # give a just-exited worker's message a moment to arrive
                    try:
                        rank, ok, value = results.get(timeout=2)
                        reports[rank] = (ok, pickle.loads(value) if ok else value)
                        continue
                    except queue.Empty:
                        break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(reports.items()) if not ok]
    silent = [r for r in range(nprocs) if r not in reports]
    if errors or silent:
        msg = "\n".join(errors)
        if silent:
            msg += f"\nranks {silent} reported nothing (hung past {timeout}s or died)"
        raise AssertionError(msg)
    return [reports[r][1] for r in range(nprocs)]
