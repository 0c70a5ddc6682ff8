"""One rank of a 2-rank save dies (SIGKILL, in the middle of writing its shard): the other
rank gets an error well within the collective timeout instead of hanging, nothing of the
new save is committed, the previous checkpoint still loads with its exact values, and the
next save clears whatever the dead save left behind.

The workers are forked by hand here rather than through ``tests/dist/harness.run_ranks``,
which treats a rank that never reports as a failure: here that rank is the point.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ckptio import Booster
from ckptio.formats.naming import OLD_MARK, TMP_MARK
from ckptio.plugins import TorchFSDPPlugin
from tests.dist.faults import wrap_writes
from tests.dist.models import diff_keys, make_uneven

pytestmark = pytest.mark.dist  # real ranks, forked by hand

COLLECTIVE_TIMEOUT = 30  # seconds; the survivor must fail well before this


def _save(ck: Path, seed: int) -> None:
    booster = Booster(plugin=TorchFSDPPlugin(shard_classes={"Block"}))
    model, *_ = booster.boost(make_uneven(seed))
    booster.save_model(model, ck, shard=True, use_safetensors=True, size_per_shard=0.0002)


def _worker(rank: int, workdir: Path, ck: Path, victim: int, results) -> None:
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{workdir / 'rendezvous'}",
            rank=rank,
            world_size=2,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT),
        )
        _save(ck, seed=0)
        dist.barrier()
        if rank == victim:
            # the first bytes of the new save reach the disk, then this rank dies
            wrap_writes(after=lambda: os.kill(os.getpid(), signal.SIGKILL))
        started = time.monotonic()
        try:
            _save(ck, seed=1)
        except Exception as exc:  # noqa: BLE001 (reported to the parent, which judges it)
            results.put((rank, "error", (type(exc).__name__, str(exc)[:2000], time.monotonic() - started)))
        else:
            results.put((rank, "saved", None))
    except BaseException:  # noqa: BLE001
        results.put((rank, "crashed", traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TMP_MARK in p.name or OLD_MARK in p.name)


@pytest.mark.parametrize("victim", [0, 1], ids=["master-dies", "worker-dies"])
def test_one_rank_dies_mid_save_nothing_committed(tmp_path, victim):
    ck = tmp_path / "ck"
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, tmp_path, ck, victim, results)) for r in range(2)]
    for p in procs:
        p.start()
    survivor = 1 - victim
    report = None
    deadline = time.monotonic() + COLLECTIVE_TIMEOUT + 60
    try:
        while report is None and time.monotonic() < deadline:
            try:
                rank, kind, value = results.get(timeout=0.5)
            except queue.Empty:
                continue
            assert rank == survivor, f"the killed rank {rank} reported {kind}: {value}"
            report = (kind, value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    assert procs[victim].exitcode == -signal.SIGKILL
    assert report is not None, "the surviving rank hung"
    kind, value = report
    assert kind == "error", f"the surviving rank should have failed the save, got {kind}: {value}"
    name, message, seconds = value
    assert seconds < COLLECTIVE_TIMEOUT, f"the survivor noticed only after {seconds:.1f}s: {name}: {message}"
    assert name == "DistributedCheckpointError" and "lost contact with another rank" in message, (name, message)

    # Nothing of the new save is visible: the folder holds the first save, verified byte for byte.
    plain = make_uneven(9)
    Booster().load_model(plain, ck, verify=True)
    assert diff_keys(plain.state_dict(), make_uneven(0).state_dict()) == []
    # The next save (any world size) clears what the dead save left and commits normally.
    Booster().save_model(make_uneven(2), ck, shard=True, use_safetensors=True, size_per_shard=0.0002)
    assert _hidden(tmp_path) == []
    Booster().load_model(plain, ck, verify=True)
    assert diff_keys(plain.state_dict(), make_uneven(2).state_dict()) == []
