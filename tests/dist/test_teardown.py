"""Every rank of a DDP save exits after ``destroy_process_group()``: forked 2-rank rounds of
boost, train, save, barrier, destroy, return, each judged by both processes ending in time.

The hang this guards against (issue 17, item 9) is torch's: when the DDP reducer holds the
last reference to the gloo group, the module's teardown runs ``~ProcessGroupGloo`` inside the
reducer's destructor with the GIL held, and that joins gloo's worker threads; a worker still
releasing its last finished collective needs the GIL to free the Python objects it holds, so
neither thread moves. ``TorchDDPPlugin`` now makes the group's last reference a Python one,
dropped after the reducer (its destructor releases the GIL first).

On a loaded machine a gloo worker is starved by chance between finishing a collective and
releasing it (about 1 round in 7 here, without the fix). Here each rank runs on one CPU with
gloo's workers at the lowest priority, so they are starved whenever the main thread runs:
without the fix, 30 of 32 rounds hung.
"""

from __future__ import annotations

import copy
import io
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from tests.dist.harness import run_ranks
from tests.dist.models import make_optimizer, make_uneven

from ckptio import Booster
from ckptio.plugins import TorchDDPPlugin

ROUNDS = 8
ROUND_DEADLINE_S = 20.0  # a healthy round takes 1-2 s on a loaded 2-core machine
GLOO_WORKER = "pt_gloo_runloop"  # the thread name torch gives ProcessGroupGloo's workers


def _tilt_the_race(rank: int) -> None:
    """Put this rank (threads made later inherit it) on one CPU, with gloo's workers last in line for it."""
    cpus = sorted(os.sched_getaffinity(0))
    cpu = {cpus[rank % len(cpus)]}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == GLOO_WORKER:
                    os.setpriority(os.PRIO_PROCESS, int(tid), 19)
            os.sched_setaffinity(int(tid), cpu)
        except OSError:  # a thread that ended meanwhile
            pass


def _round(rank: int, root: str) -> None:
    """One rank of one round; returning is the point: the model, optimizer and booster die here."""
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    _tilt_the_race(rank)
    booster = Booster(plugin=TorchDDPPlugin())
    model = make_uneven(0)
    model, optimizer, *_ = booster.boost(model, make_optimizer(model))
    loss = model(torch.randint(0, 13, (4, 3), generator=torch.Generator().manual_seed(rank))).square().mean()
    booster.backward(loss, optimizer)
    optimizer.step()
    booster.save_model(model, f"{root}/model", shard=True, use_safetensors=True, size_per_shard=0.0002)
    booster.save_optimizer(optimizer, f"{root}/optim", shard=True, size_per_shard=0.0003)
    dist.barrier()
    dist.destroy_process_group()


def _native_stacks(pid: int) -> str:
    """The stuck rank's native stacks (py-spy, a dev dependency), for the failure message."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    try:
        out = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(no stacks: {exc})"
    return (out.stdout + out.stderr)[-6000:]


def test_every_rank_exits_after_a_ddp_save_and_destroy(tmp_path):
    # Forking after torch._dynamo is imported, as in any session that already ran DDP, FSDP or
    # torch.compile in-process: when DDP's first use imports it inside the rank instead, that import
    # keeps references to the live group, which then outlives the worker and is never torn down.
    import torch._dynamo  # noqa: F401

    fork = multiprocessing.get_context("fork")
    for n in range(ROUNDS):
        root = tmp_path / f"round-{n}"
        root.mkdir()
        ranks = [fork.Process(target=_round, args=(rank, str(root))) for rank in range(2)]
        for p in ranks:
            p.start()
        deadline = time.monotonic() + ROUND_DEADLINE_S
        for p in ranks:
            p.join(max(0.0, deadline - time.monotonic()))
        stuck = [(rank, p.pid) for rank, p in enumerate(ranks) if p.is_alive()]
        stacks = {rank: _native_stacks(pid) for rank, pid in stuck}
        for p in ranks:
            if p.is_alive():
                p.kill()
            p.join()
        assert not stuck, f"round {n}: ranks {[r for r, _ in stuck]} never exited:\n" + "\n".join(
            f"--- rank {rank} ---\n{text}" for rank, text in stacks.items()
        )
        assert [p.exitcode for p in ranks] == [0, 0], f"round {n}: exit codes {[p.exitcode for p in ranks]}"
        shutil.rmtree(root, ignore_errors=True)


def test_a_boosted_ddp_model_still_pickles_and_copies(tmp_path):
    """The reference the plugin keeps on the module is left out of pickles and copies, as DDP's own is."""

    def scenario():
        model, *_ = Booster(plugin=TorchDDPPlugin()).boost(make_uneven(0))
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        copied = copy.deepcopy(model)
        return [
            all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
            for other in (loaded, copied)
        ]

    assert run_ranks(lambda ctx: ctx.phase(1, "pickle", scenario), 1, tmp_path) == [[True, True]]
