"""Which write-path changes pay off: the same sharded save with each one switched off in turn.

    .venv/bin/python benchmarks/ablation.py --size-gb 1 --repeats 5

Variants (all durable: fsync per file, commit): the seed writer (buffered stream, one
write per tensor, one shard after another), then with the current writer and: no early
writeback, one shard thread, both; and the default with the progress bar shown (as on a
terminal), to check that the bar costs nothing measurable. Also the raw fsync'd write of the
same bytes. The
variants take turns in each repeat; medians are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import run  # noqa: E402

from ckptio import progress  # noqa: E402
from ckptio.engine import write as engine_write  # noqa: E402
from ckptio.storage import atomic, local  # noqa: E402
from ckptio.storage.base import FileRecord, HashingStream  # noqa: E402


class SeedWriter(local.LocalFileWriter):
    """The writer before this work: a buffered-free stream, one write call per chunk."""

    def write(self, name, chunks):
        raw, path = self._open(name)
        try:
            stream = HashingStream(raw)
            for chunk in chunks:
                stream.write(chunk)
            os.fsync(raw.fileno())
        finally:
            raw.close()
        return FileRecord(name, stream.size, stream.hexdigest())


@contextlib.contextmanager
def variant(seed_writer: bool, early_writeback: bool, threads: int, progress_bar: bool = False):
    saved = (atomic.LocalFileWriter, local._sync_file_range, engine_write.WRITE_THREADS, progress.progress_enabled)
    try:
        if seed_writer:
            atomic.LocalFileWriter = SeedWriter
        if not early_writeback:
            local._sync_file_range = None
        engine_write.WRITE_THREADS = threads
        if progress_bar:  # as on a terminal: the bar's polling thread runs during the save
            progress.progress_enabled = lambda quiet=False: not quiet
        yield
    finally:
        atomic.LocalFileWriter, local._sync_file_range, engine_write.WRITE_THREADS, progress.progress_enabled = saved


VARIANTS = {
    "seed writer, 1 thread": (True, False, 1),
    "new writer, early writeback, 1 thread": (False, True, 1),
    "new writer, no early writeback, 2 threads": (False, False, 2),
    "new writer, early writeback, 2 threads (default)": (False, True, engine_write.WRITE_THREADS),
    "default, with the progress bar shown": (False, True, engine_write.WRITE_THREADS, True),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shard-mib", type=int, default=256)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--only", nargs="*", default=None, help="run only variants whose name contains one of these")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of rest after a sync, before each save")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ckptio-ablation-", dir=args.dir))
    ctx = run.build_context(args.size_gb, root, args.shard_mib)
    names = ["raw fsync'd write", "raw, shard-sized files", *VARIANTS]
    if args.only:
        names = [n for n in names if n == "raw fsync'd write" or any(part in n for part in args.only)]
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for rep in range(args.repeats):
            for name in run._rotate(names, rep):
                path = root / "ckpt"
                cases.remove(path)
                os.sync()
                time.sleep(args.settle)
                if name in VARIANTS:
                    with variant(*VARIANTS[name]):
                        start = time.perf_counter()
                        cases.ours_save(ctx, path)
                else:
                    save = cases.raw_save if name == "raw fsync'd write" else cases.raw_files_save
                    start = time.perf_counter()
                    save(ctx, path)
                times[name].append(time.perf_counter() - start)
    finally:
        cases.remove(root)
    size = ctx.read_buffer.numel()
    raw = statistics.median(times["raw fsync'd write"])
    print(f"{size / 1e9:.2f} GB, median of {args.repeats}, {run.machine()['date_utc']}")
    print("| variant | median s (quartiles) | GB/s | raw time / variant time |\n|---|---:|---:|---:|")
    for name in names:
        med = statistics.median(times[name])
        q = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else [med, med, med]
        print(f"| {name} | {med:.3f} ({q[0]:.2f}-{q[2]:.2f}) | {size / med / 1e9:.2f} | {raw / med:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps({"size_bytes": size, "seconds": times}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
