"""torch alone (no ckptio): a rank can hang forever when a DDP module dies after destroy_process_group().

    .venv/bin/python scripts/torch_ddp_teardown_deadlock.py [rounds] [--untilted] [--workaround]

Each round forks 2 gloo ranks that wrap a Linear in DDP, run one step, barrier, destroy the
group and return. When the reducer holds the group's last reference, the module's deallocation
runs ~ProcessGroupGloo inside ~Reducer with the GIL held (pybind's dealloc_without_manipulating_gil),
and it joins gloo's workers; a worker still releasing a finished collective needs the GIL
(TensorImpl::decref_pyobject, or a SafePyObject in the work's ThreadLocalState), so neither moves.

The parent imports torch._dynamo before forking, as a long test session has: imported inside
the rank instead, it keeps references to the live group, which then never dies and hides this.
By default each rank runs on one CPU with gloo's workers at nice 19 (they are starved whenever
the main thread runs, as under load): nearly every round hangs. ``--untilted``: about 1 round
in 7 on a loaded 2-core machine. ``--workaround``: a Python reference to the group is set on the
module after DDP's constructor, so it is dropped after the reducer and the group dies through its
Python object, whose destructor releases the GIL (what ckptio's TorchDDPPlugin does): no hangs.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def tilt(rank):
    cpus = sorted(os.sched_getaffinity(0))
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            if f.read().strip() == "pt_gloo_runloop":
                os.setpriority(os.PRIO_PROCESS, int(tid), 19)
        os.sched_setaffinity(int(tid), {cpus[rank % len(cpus)]})


def worker(rank, init, tilted, workaround):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    if tilted:
        tilt(rank)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(24, 7))
    if workaround:
        model.__dict__["_keep_group"] = model.process_group
    model(torch.randn(6, 24)).sum().backward()
    dist.barrier()
    dist.destroy_process_group()
    # returning drops `model`: the reducer, and with it the group, dies here


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 10
    tilted, workaround = "--untilted" not in sys.argv, "--workaround" in sys.argv
    import torch._dynamo  # noqa: F401

    hangs = 0
    for n in range(rounds):
        root = tempfile.mkdtemp()
        ctx = mp.start_processes(
            worker, args=(f"file://{root}/rdzv", tilted, workaround), nprocs=2, join=False, start_method="fork"
        )
        deadline = time.monotonic() + 15
        for p in ctx.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for rank, p in enumerate(ctx.processes):
            if p.is_alive():
                hangs += 1
                print(f"round {n}: rank {rank} (pid {p.pid}) still alive after 15 s", flush=True)
                spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
                if hangs == 1 and os.path.exists(spy):
                    dump = [spy, "dump", "--native", "--pid", str(p.pid)]
                    print(subprocess.run(dump, capture_output=True, text=True).stdout[-5000:], flush=True)
                p.kill()
                p.join()
        shutil.rmtree(root, ignore_errors=True)
    print(f"{hangs} hung rank(s) in {rounds} rounds (tilted={tilted}, workaround={workaround})")
    sys.exit(1 if hangs else 0)


if __name__ == "__main__":
    main()
