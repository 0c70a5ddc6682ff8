"""What checkpointing costs a training loop: ckptio (sync, async) against DCP ``async_save``.

    .venv/bin/python benchmarks/loop.py                      # 1 process, 0.5 GB GPT-2, AdamW
    .venv/bin/python benchmarks/loop.py --nproc 2            # 2 FSDP2 ranks (gloo, forked)
    .venv/bin/python benchmarks/loop.py --smoke              # a 20 MB model, a few steps: does it run?
    .venv/bin/python benchmarks/loop.py --modes writers      # the writer study (docs/design.md)

A GPT-2-shaped model (float32, ``--size-gb``; 0.5 GB is 6 layers of width 1024 and GPT-2's
vocabulary) trains on CPU with AdamW (``foreach``) on one fixed batch of ``--seq`` tokens; the
state saved is the model and Adam's two moments (3x the model). Each *mode* runs the same loop of
``--steps`` steps with a checkpoint after every ``--every``-th step (none in the last
``--every`` steps, so background work overlaps the loop instead of spilling past its end);
within each repeat the modes take turns (the order rotates), each starting with one warm-up step
and checkpoint (buffers allocated, writer processes started) and a ``sync``. Per mode:

* **slowdown**: median loop time over the repeats / the median of ``none`` (no checkpoints) - 1;
* **blocked per checkpoint**: the time the loop spent on one checkpoint: the call (which first
  waits for the previous save, if still running), plus waits for the copy before the step
  (ckptio's guards, DCP's staging future); median over every checkpoint of every repeat (with
  several ranks, the slowest rank's);
* **drain**: after the loop, the wait until the last checkpoint is durable (not in the loop time).

Modes (``--modes main``): ``none``; ``ckptio sync``: ``save_checkpoint(...)``; ``ckptio async``:
``save_checkpoint(..., use_async=True)`` (the library's defaults); ``dcp thread`` /
``dcp process``: ``dcp.async_save(get_state_dict(model, optimizer), async_checkpointer_type=...)``
as documented (its default stager copies during the call; a gloo group of its own, as
torchtitan gives it), the previous save's future awaited before the next;
``dcp thread/process, async staging``: the same with a persistent
``DefaultStager(use_async_staging=True)`` (its zero-overhead mode: the loop waits for the staging
future before ``optimizer.step()``). ``--modes writers`` (one process): ckptio async with its
writer thread at the loop's priority or at nice 19 + idle I/O class, and the persistent writer
process of ``benchmarks/process_writer.py`` at both. Checkpoints alternate between two folders
per mode, so each save replaces the one from two saves before (ckptio: atomically; DCP: files
overwritten in place). Writes ``loop-<nproc>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import gpt_config  # noqa: E402

MAIN = ["none", "ckptio sync", "ckptio async", "dcp thread", "dcp process", "dcp thread, async staging",
        "dcp process, async staging"]  # fmt: skip
WRITERS = ["none", "ckptio async, thread, nice 0", "ckptio async, thread, nice 19 + idle io",
           "ckptio async, process, nice 0", "ckptio async, process, nice 19 + idle io"]  # fmt: skip


# ------------------------------------------------------------------ how each mode checkpoints
class NoCheckpoint:
    def __init__(self) -> None:
        self.blocked: list[float] = []

    def save(self, n: int) -> None:
        pass

    def before_step(self) -> float:
        return 0.0

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class Ckptio(NoCheckpoint):
    """``save_checkpoint`` into ``root``; async: blocked = the call + the guards' waits (the handle's)."""

    def __init__(self, booster, model, optimizer, root: Path, use_async: bool, shard_mib: int, writer=None):
        super().__init__()
        self.booster, self.model, self.optimizer, self.root = booster, model, optimizer, root
        self.use_async, self.shard_mib, self.writer = use_async, shard_mib, writer
        self._handles: list = []

    def save(self, n: int) -> None:
        from ckptio.async_io import writer as writer_module
        from ckptio.training import save_checkpoint

        if self.writer is not None:  # (nice, io) of the writer thread for this mode
            writer_module.WRITER_NICE, writer_module.WRITER_IO = self.writer
        start = time.perf_counter()
        save_checkpoint(self.root, self.booster, self.model, self.optimizer, None, 0, n % 2, 1,
                        use_async=self.use_async, size_per_shard=self.shard_mib)  # fmt: skip
        if self.use_async:
            self._handles.append(self.booster.checkpoint_io.last_save)
        else:
            self.blocked.append(time.perf_counter() - start)

    def drain(self) -> None:
        self.booster.wait()
        self.blocked += [h.blocked_seconds for h in self._handles]
        self._handles = []


class ProcessCkptio(NoCheckpoint):
    """The writer-process variant (benchmarks/process_writer.py), one process only."""

    def __init__(self, model, optimizer, root: Path, shard_mib: int, nice: int, io: str | None):
        from process_writer import ProcessWriter

        super().__init__()
        self.model, self.optimizer, self.root = model, optimizer, root
        self.writer = ProcessWriter(nice=nice, io=io, shard_bytes=shard_mib * 1024 * 1024)
        self._pending: float | None = None

    def save(self, n: int) -> None:
        from ckptio.engine.optimizer import flat_optimizer_state
        from ckptio.state.model import model_state_to_save

        start = time.perf_counter()
        tensors, _ = model_state_to_save(self.model)
        flat, _ = flat_optimizer_state(self.optimizer)
        self.writer.save(tensors, flat, self.root / f"epoch-0_step-{n % 2}")
        self._pending = time.perf_counter() - start

    def before_step(self) -> float:
        waited = self.writer.before_step()
        if self._pending is not None:
            self.blocked.append(self._pending + waited)
            self._pending = None
        return waited

    def drain(self) -> None:
        self.writer.wait()

    def close(self) -> None:
        self.writer.close()


class Dcp(NoCheckpoint):
    """``dcp.async_save``; blocked = waiting for the previous save + the call (+ the staging future)."""

    def __init__(self, model, optimizer, root: Path, process: bool, async_staging: bool):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        super().__init__()
        self.model, self.optimizer, self.root = model, optimizer, root
        self.kind = AsyncCheckpointerType.PROCESS if process else AsyncCheckpointerType.THREAD
        # pinned memory and non-blocking copies need an accelerator; shared memory for the process
        self.stager = DefaultStager(StagingOptions(False, process, True, False)) if async_staging else None
        # a group of its own, as torchtitan does: the save's collectives must not interleave with FSDP's
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._upload = None
        self._staging = None
        self._pending: float | None = None

    def save(self, n: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        start = time.perf_counter()
        if self._upload is not None:
            self._upload.result()  # one save at a time: DCP's own examples wait for the previous future
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        response = dcp.async_save(
            {"model": model_sd, "optim": optim_sd},
            checkpoint_id=str(self.root / f"step-{n % 2}"),
            async_checkpointer_type=self.kind,
            async_stager=self.stager,
            process_group=self.group,
        )
        if hasattr(response, "upload_completion"):
            self._upload, self._staging = response.upload_completion, response.staging_completion
        else:
            self._upload, self._staging = response, None
        self._pending = time.perf_counter() - start

    def before_step(self) -> float:
        start = time.perf_counter()
        if self._staging is not None:
            self._staging.result()
            self._staging = None
        waited = time.perf_counter() - start
        if self._pending is not None:
            self.blocked.append(self._pending + waited)
            self._pending = None
        return waited

    def drain(self) -> None:
        self.before_step()
        if self._upload is not None:
            self._upload.result()
            self._upload = None

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()


def make_checkpointer(mode: str, booster, model, optimizer, root: Path, shard_mib: int):
    root = root / mode.replace(" ", "_").replace(",", "").replace("+", "")
    root.mkdir(parents=True, exist_ok=True)
    if mode == "none":
        return NoCheckpoint()
    if mode in ("ckptio sync", "ckptio async"):
        return Ckptio(booster, model, optimizer, root, mode == "ckptio async", shard_mib)
    if mode.startswith("ckptio async, thread"):
        writer = (0, None) if mode.endswith("nice 0") else (19, "idle")
        return Ckptio(booster, model, optimizer, root, True, shard_mib, writer=writer)
    if mode.startswith("ckptio async, process"):
        nice, io = (0, None) if mode.endswith("nice 0") else (19, "idle")
        return ProcessCkptio(model, optimizer, root, shard_mib, nice, io)
    if mode.startswith("dcp"):
        return Dcp(model, optimizer, root, "process" in mode, "async staging" in mode)
    raise ValueError(f"unknown mode {mode!r}")


# ------------------------------------------------------------------ the loop
def _build(args, nproc: int):
    from transformers import GPT2LMHeadModel

    from ckptio import Booster
    from ckptio.plugins import TorchFSDPPlugin

    torch.manual_seed(0)
    config = gpt_config(int(args.size_gb * 1024**3))
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    booster = Booster(plugin=TorchFSDPPlugin() if nproc > 1 else None)
    model, optimizer, *_ = booster.boost(model, optimizer)
    batch = torch.randint(0, config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(1))
    return booster, model, optimizer, batch


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def run_rank(rank: int, nproc: int, args, workdir: Path) -> dict:
    booster, model, optimizer, batch = _build(args, nproc)
    modes = WRITERS if args.modes == "writers" else MAIN if args.modes == "main" else args.modes.split(";")
    checkpointers = {m: make_checkpointer(m, booster, model, optimizer, workdir / "ck", args.shard_mib) for m in modes}

    def step(before_step) -> float:
        start = time.perf_counter()
        model(batch, labels=batch).loss.backward()
        before_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    loops: dict[str, list[float]] = {m: [] for m in modes}
    drains: dict[str, list[float]] = {m: [] for m in modes}
    steps: dict[str, list[float]] = {m: [] for m in modes}
    loads: list[float] = []
    for repeat in range(args.repeats):
        order = modes[repeat % len(modes) :] + modes[: repeat % len(modes)]
        for mode in order:
            ck = checkpointers[mode]
            step(ck.before_step)  # warm-up: buffers allocated, writer processes started
            ck.save(0)
            step(ck.before_step)
            ck.drain()
            ck.blocked.clear()
            os.sync()
            _barrier()
            loads.append(os.getloadavg()[0])
            start = time.perf_counter()
            for n in range(1, args.steps + 1):
                steps[mode].append(step(ck.before_step))
                if n % args.every == 0 and n <= args.steps - args.every:
                    ck.save(n)
            _barrier()
            loops[mode].append(time.perf_counter() - start)
            start = time.perf_counter()
            ck.drain()
            _barrier()
            drains[mode].append(time.perf_counter() - start)
            os.sync()
            print(f"rank {rank} repeat {repeat} {mode}: loop {loops[mode][-1]:.2f} s, blocked "
                  f"{[round(b, 3) for b in ck.blocked[-args.steps // args.every:]]}", file=sys.stderr, flush=True)
    blocked = {m: list(checkpointers[m].blocked) for m in modes}
    for ck in checkpointers.values():
        ck.close()
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"loops": loops, "drains": drains, "steps": steps, "blocked": blocked, "loads": loads, "model_bytes": nbytes}


def _worker(rank: int, nproc: int, args, workdir: Path, results) -> None:
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // nproc))
        dist.init_process_group(
            "gloo", init_method=f"file://{workdir}/rdzv", rank=rank, world_size=nproc, timeout=timedelta(seconds=1800)
        )
        results.put((rank, True, run_rank(rank, nproc, args, workdir)))
    except BaseException:  # noqa: BLE001
        results.put((rank, False, traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)


def summarize(reports: list[dict], args) -> dict:
    first = reports[0]
    modes = list(first["loops"])
    base = statistics.median(first["loops"]["none"])
    sync = first["blocked"].get("ckptio sync")
    sync_s = statistics.median(sync) if sync else None
    rows = {}
    for mode in modes:
        # per checkpoint, the slowest rank's blocked time
        blocked = [max(values) for values in zip(*(r["blocked"][mode] for r in reports))]
        loop = statistics.median(first["loops"][mode])
        rows[mode] = {
            "loop_s": loop,
            "slowdown": loop / base - 1,
            "blocked_median_s": statistics.median(blocked) if blocked else 0.0,
            "blocked_max_s": max(blocked) if blocked else 0.0,
            "blocked_vs_sync_save": (statistics.median(blocked) / sync_s) if blocked and sync_s else None,
            "drain_s": statistics.median(first["drains"][mode]),
            "step_median_s": statistics.median(first["steps"][mode]),
        }
    return {"rows": rows, "sync_save_s": sync_s, "baseline_loop_s": base}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=0.5, help="model size (float32); Adam's state is 2x more")
    parser.add_argument("--seq", type=int, default=32, help="tokens per step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4, help="checkpoint after every N-th step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=1, help="1: one process; 2+: FSDP2 ranks")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / nproc)")
    parser.add_argument("--modes", default="main", help="main, writers, or modes separated by ';'")
    parser.add_argument("--shard-mib", type=int, default=256, help="ckptio's size_per_shard")
    parser.add_argument("--smoke", action="store_true", help="a 20 MB model, 4 steps, 1 repeat")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary folder)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.size_gb, args.steps, args.every, args.repeats, args.seq = 0.02, 4, 2, 1, 16
    workdir = Path(tempfile.mkdtemp(prefix="ckptio-loop-", dir=args.dir))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        ctx = mp.get_context("fork")
        results = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, args.nproc, args, workdir, results)) for r in range(args.nproc)]
        for p in procs:
            p.start()
        reports = {}
        while len(reports) < len(procs):
            try:
                rank, ok, value = results.get(timeout=10)
                reports[rank] = (ok, value)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in reports]
                if dead:  # a rank died without reporting (e.g. a native abort): do not wait forever
                    for p in procs:
                        p.kill()
                    print(f"rank(s) {dead} died: exit codes {[procs[r].exitcode for r in dead]}", file=sys.stderr)
                    return 1
        for p in procs:
            p.join(120)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = [v for ok, v in reports.values() if not ok]
    if failed:
        print("\n".join(failed), file=sys.stderr)
        return 1
    ordered = [reports[r][1] for r in range(args.nproc)]
    summary = summarize(ordered, args)
    state_gb = ordered[0]["model_bytes"] * 3 / 1e9
    loads = ordered[0]["loads"]
    print(f"{started}, {args.nproc} process(es), model {ordered[0]['model_bytes'] / 1e9:.2f} GB (state ~{state_gb:.2f} "
          f"GB with Adam), {args.steps} steps, a checkpoint every {args.every}, median of {args.repeats}; load average "
          f"at the modes' starts: median {statistics.median(loads):.1f}, max {max(loads):.1f}")
    sync_s = summary["sync_save_s"] or 0.0
    print(f"no checkpoints: loop {summary['baseline_loop_s']:.2f} s; a sync save blocks {sync_s:.3f} s")
    print("| mode | loop s | slowdown | blocked per checkpoint, median s (max) | blocked / sync save | drain s |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, row in summary["rows"].items():
        ratio = f"{row['blocked_vs_sync_save']:.1%}" if row["blocked_vs_sync_save"] is not None else ""
        print(f"| {mode} | {row['loop_s']:.2f} | {row['slowdown']:+.1%} | {row['blocked_median_s']:.3f} "
              f"({row['blocked_max_s']:.3f}) | {ratio} | {row['drain_s']:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"started": started, "args": vars(args), "summary": summary, "ranks": ordered}
    (out / f"loop-{args.nproc}.json").write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
