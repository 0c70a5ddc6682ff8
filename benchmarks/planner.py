"""Planning a save for many ranks, simulated: time and memory of one rank's planning as the
number of ranks grows, with the planner's real code and no process group.

    .venv/bin/python benchmarks/planner.py --ranks 8 64 1024 --tensors 10000

Each rank of a real save runs, with no knowledge of the others' boxes: the spread of every
tensor (from its mesh and placements, :mod:`ckptio.engine.spread`), the file plan (shards,
owners), the safetensors layout of every file, and its own steps (which bytes it writes where,
:func:`ckptio.engine.inplace.rank_steps`). The state here: ``--tensors`` tensors shaped like a
transformer's (matrices and vectors), sharded ``Shard(0)`` over a 2-D ``(dp, tp=8)`` mesh with
``Shard(0)`` or ``Shard(1)`` on ``tp`` (column/row parallel), norms replicated. The report gives
seconds and peak Python memory (``tracemalloc``) for the first and the last rank: neither
should grow with the number of ranks (the plan is O(tensors) per rank).
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc

import torch
from torch.distributed.tensor import Shard

from ckptio.engine.inplace import file_layout, rank_steps
from ckptio.engine.plan import plan_files
from ckptio.engine.split import assign_owners
from ckptio.engine.spread import Mesh, MeshSpread, WholeSpread


def synthetic_state(n_tensors: int) -> list[tuple[str, torch.dtype, tuple[int, ...], str]]:
    """(name, dtype, shape, kind): kind 'col' / 'row' (tensor parallel), 'norm' (replicated)."""
    out = []
    for i in range(n_tensors):
        layer, slot = divmod(i, 5)
        if slot == 4:
            out.append((f"layers.{layer}.norm.weight", torch.float32, (1024,), "norm"))
        elif slot % 2:
            out.append((f"layers.{layer}.w{slot}.weight", torch.bfloat16, (4096, 1024), "col"))
        else:
            out.append((f"layers.{layer}.w{slot}.weight", torch.bfloat16, (1024, 4096), "row"))
    return out


def plan_one_rank(state, world: int, rank: int, tp: int = 8, max_shard_bytes: int = 5 * 2**30):
    """Everything one rank computes to save ``state`` on ``world`` ranks; returns its steps."""
    dp = world // tp
    mesh = Mesh(tuple(range(world)), (dp, tp))  # one object for every tensor
    col, row = (Shard(0), Shard(0)), (Shard(0), Shard(1))
    sizes = [(k, torch.Size(shape).numel() * dtype.itemsize) for k, dtype, shape, _ in state]
    whole = [(k, n) for (k, n), (_, _, _, kind) in zip(sizes, state) if kind == "norm"]
    writers = dict(zip((k for k, _ in whole), assign_owners([n for _, n in whole], world)))
    spreads = {
        k: WholeSpread(shape, writers[k]) if kind == "norm" else MeshSpread(shape, mesh, col if kind == "col" else row)
        for k, _, shape, kind in state
    }
    meta = {k: (dtype, shape) for k, dtype, shape, _ in state}
    plan = plan_files(sizes, world, weights_name="model.safetensors", max_shard_bytes=max_shard_bytes)
    layouts = [file_layout(name, keys, meta) for name, keys in plan.files]
    return rank_steps(plan, meta, spreads, layouts, rank)


def measure(state, world: int, rank: int) -> tuple[float, int, int]:
    """Seconds (a plain run), then peak memory (a second run under ``tracemalloc``, which is slow)."""
    start = time.perf_counter()
    steps = plan_one_rank(state, world, rank)
    seconds = time.perf_counter() - start
    tracemalloc.start()
    plan_one_rank(state, world, rank)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak, len(steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 1024])
    parser.add_argument("--tensors", type=int, default=10_000)
    args = parser.parse_args(argv)
    state = synthetic_state(args.tensors)
    print(f"planning a save of {args.tensors} tensors, one rank's share, simulated")
    print(f"{'ranks':>6} {'rank':>6} {'seconds':>8} {'peak MiB':>9} {'steps':>7}")
    worst = 0.0
    for world in args.ranks:
        for rank in (0, world - 1):
            seconds, peak, steps = measure(state, world, rank)
            worst = max(worst, seconds)
            print(f"{world:>6} {rank:>6} {seconds:>8.3f} {peak / 2**20:>9.1f} {steps:>7}")
    print(f"slowest: {worst:.3f} s (target: at most 1 s at 1,024 ranks x 10,000 tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
