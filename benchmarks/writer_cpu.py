"""How much CPU one async save costs the process: ckptio against DCP ``async_save``.

    .venv/bin/python benchmarks/writer_cpu.py --size-gb 0.5 --repeats 3

The loop benchmark (``benchmarks/loop.py``) measures what a save costs a training loop, which on
a machine whose cores the loop keeps busy is mostly the CPU the background save takes from it.
This measures that CPU directly and alone: the state of ``loop.py``'s GPT-2-shaped model with
AdamW (one real step first, so the moments exist), one async save at a time waited to the end,
and the process's user and system CPU time (``getrusage``: every thread, the writers included)
from the call to durable. A warm-up save first (buffers allocated); the median of the repeats.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def measure(save, repeats: int) -> dict[str, float]:
    samples = []
    for n in range(repeats + 1):
        os.sync()
        user, system, start = *_cpu(), time.perf_counter()
        save(n)
        user2, system2 = _cpu()
        if n:  # the first one allocates the staging buffers
            samples.append((user2 - user, system2 - system, time.perf_counter() - start))
    samples.sort(key=lambda s: s[0] + s[1])
    user, system, wall = samples[len(samples) // 2]
    return {"user_s": user, "system_s": system, "cpu_s": user + system, "wall_s": wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary folder)")
    args = parser.parse_args(argv)

    import loop
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ckptio.engine import write
    from ckptio.training import save_checkpoint

    booster, model, optimizer, batch = loop._build(types.SimpleNamespace(size_gb=args.size_gb, seq=32), 1)
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    root = Path(tempfile.mkdtemp(prefix="ckptio-cpu-", dir=args.dir))

    def ckptio_save(threads: int):
        def save(n: int) -> None:
            write.WRITE_THREADS = threads
            save_checkpoint(root / f"ckptio{threads}", booster, model, optimizer, None, 0, n % 2, 1,
                            use_async=True, size_per_shard=256)  # fmt: skip
            booster.wait()

        return save

    def dcp_save(n: int) -> None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optimizer_state}
        dcp.async_save(state, checkpoint_id=str(root / f"dcp{n % 2}")).result()

    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"{nbytes / 1e9:.2f} GB model, ~{3 * nbytes / 1e9:.2f} GB with AdamW; median of {args.repeats}")
    try:
        rows = {
            "ckptio async (2 write threads, the default)": measure(ckptio_save(2), args.repeats),
            "ckptio async (1 write thread)": measure(ckptio_save(1), args.repeats),
            "dcp async_save (thread)": measure(dcp_save, args.repeats),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = rows["ckptio async (2 write threads, the default)"]["cpu_s"]
    print("| tool | user s | system s | CPU s | / ckptio's | wall s |\n|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['user_s']:.2f} | {r['system_s']:.2f} | {r['cpu_s']:.2f} | {r['cpu_s'] / base:.2f} | "
              f"{r['wall_s']:.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sys.exit(main())
