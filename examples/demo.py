"""The main job: a training run that is interrupted and resumed in a new process, and must
match a run that was never interrupted, bit for bit.

Three separate processes train the same small model with dropout on synthetic data, read
through a shuffling ``StatefulDistributedSampler``, with AdamW (two param groups), a warmup +
cosine LR schedule and NumPy noise augmentation:

1. ``straight``: every step, no interruption;
2. ``first``: checkpoints through a ``CheckpointManager`` every ``--save-every`` steps,
   keeping the newest ``--keep-last``, and dies (``os._exit``) after step ``--interrupt-at``,
   in the middle of an epoch;
3. ``resume``: a fresh process asks the manager for the newest complete checkpoint, resumes
   from it and trains to the end (the steps after that checkpoint are done again).

Every per-step loss and every final weight of 2+3 must equal those of 1 (``torch.equal``,
losses compared as exact float bits). Each run uses ``--nproc`` ranks (default 2, one process
each, gloo on 127.0.0.1) with ``--plugin`` (default ``fsdp``: FSDP2; ``ddp``; ``none`` for one
plain process). Finally the resumed run's last training checkpoint is loaded on 1 rank (this
process, no plugin) and its weights checked. Prints a summary; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckptio import Booster, CheckpointManager
from ckptio.plugins import TorchDDPPlugin, TorchFSDPPlugin
from ckptio.training import StatefulDistributedSampler, load_checkpoint

INTERRUPTED_EXIT_CODE = 17


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 128),
        nn.GELU(),
        nn.Dropout(0.2),
        nn.Linear(128, 128),
        nn.GELU(),
        nn.Dropout(0.2),
        nn.Linear(128, 4),
    )


def make_data(samples: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(samples, 32, generator=gen)
    y = (x @ torch.randn(32, 4, generator=gen)).argmax(dim=1)
    return TensorDataset(x, y)


def worker(rank: int, world_size: int, args: argparse.Namespace) -> int:
    """Train one phase (``straight``, ``first`` or ``resume``); write losses and final weights."""
    out = args.workdir / args.phase
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    dataset = make_data(args.samples * world_size)
    model = make_model()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3
    )
    sampler = StatefulDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    # The loader gets its own generator, so making a new iterator never draws from the global RNG.
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, generator=torch.Generator())
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps - 4)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[4])
    booster = Booster(plugin=make_plugin(args.plugin))
    model, optimizer, _, loader, scheduler = booster.boost(model, optimizer, None, loader, scheduler)
    manager = CheckpointManager(args.workdir / "checkpoints", booster, keep_last=args.keep_last)

    start_epoch, start_step, stats = 0, 0, {"save_s": [], "load_s": None, "resumed_from": None}
    if args.phase == "resume":
        ckpt = manager.latest()  # the newest complete checkpoint; resume() loads this one
        t0 = time.perf_counter()
        resumed = manager.resume(model, optimizer, scheduler)
        if ckpt is None or resumed is None:
            print("no checkpoint to resume from", file=sys.stderr)
            return 2
        start_epoch, start_step, sample_start = resumed
        stats["load_s"] = time.perf_counter() - t0
        stats["resumed_from"] = ckpt.name
        sampler.set_start_index(sample_start)
    global_step = start_epoch * steps_per_epoch + start_step
    stats["start_step"] = global_step

    log_name = "losses.jsonl" if rank == 0 else f"losses.rank{rank}.jsonl"
    log = open(out / log_name, "w")  # noqa: SIM115 (kept open while training, flushed per step)
    model.train()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        step = start_step if epoch == start_epoch else 0
        for x, y in loader:
            x = x + torch.from_numpy(np.random.normal(0.0, 0.01, size=tuple(x.shape)).astype(np.float32))
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            booster.backward(loss, optimizer)
            optimizer.step()
            scheduler.step()
            step += 1
            global_step += 1
            log.write(json.dumps([global_step, loss.item().hex()]) + "\n")
            log.flush()
            if args.phase == "first" and global_step % args.save_every == 0:
                t0 = time.perf_counter()
                # then rotates; with --use-async it returns after staging and the write overlaps training
                manager.save(model, optimizer, scheduler, epoch, step, args.batch_size, use_async=args.use_async)
                stats["save_s"].append(time.perf_counter() - t0)
                if rank == 0:
                    (out / "stats.json").write_text(json.dumps(stats))
            if args.phase == "first" and global_step == args.interrupt_at:
                os._exit(INTERRUPTED_EXIT_CODE)  # a crash: no cleanup, nothing flushed but what is durable
    log.close()
    booster.save_model(model, out / "final.safetensors")
    if args.phase == "resume":  # a full training checkpoint of the end, for the 1-rank check
        CheckpointManager(args.workdir / "final", booster).save(
            model, optimizer, scheduler, args.epochs, 0, args.batch_size
        )
    if rank == 0:
        (out / "stats.json").write_text(json.dumps({**stats, "steps": total_steps}))
    return 0


def make_plugin(name: str):
    """``--plugin``: FSDP2 (the default), DDP, or none (one process, or replicas by hand)."""
    return {"fsdp": TorchFSDPPlugin, "ddp": TorchDDPPlugin}[name]() if name != "none" else None


def _rank_main(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(args.nproc),
        TORCHELASTIC_USE_AGENT_STORE="True",  # the launcher hosts the store, as torchrun's agent does
    )
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo stays on 127.0.0.1
    code = 1
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
        # The user's own process group (the plugin reuses it); a short timeout so a crash never hangs.
        torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=120))
        code = worker(rank, args.nproc, args)
    except BaseException:  # noqa: BLE001 (printed; the exit code tells the launcher)
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # also how an interrupted rank dies: INTERRUPTED_EXIT_CODE from worker


def launch(args: argparse.Namespace) -> int:
    """Run ``worker`` on ``--nproc`` ranks, one process each (gloo on 127.0.0.1, a store
    hosted here); returns the ranks' common exit code, or 1 if they differ."""
    if args.plugin == "none" and args.nproc == 1:
        return worker(0, 1, args)
    store = torch.distributed.TCPStore(
        "127.0.0.1", 0, world_size=args.nproc, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=120)
    )
    ctx = torch.multiprocessing.get_context("fork")  # before any process group exists here
    procs = [ctx.Process(target=_rank_main, args=(rank, args, store.port)) for rank in range(args.nproc)]
    for proc in procs:
        proc.start()
    while any(p.is_alive() for p in procs):
        if any(p.exitcode not in (None, 0, INTERRUPTED_EXIT_CODE) for p in procs):
            for proc in procs:  # one rank crashed: do not wait for the others' timeouts
                if proc.is_alive():
                    proc.kill()
        time.sleep(0.05)
    codes = {p.exitcode for p in procs}
    return codes.pop() if len(codes) == 1 else 1


def run_phase(args: argparse.Namespace, phase: str) -> tuple[int, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--workdir", str(args.workdir)]
    for name in (
        "epochs",
        "samples",
        "batch_size",
        "save_every",
        "keep_last",
        "interrupt_at",
        "seed",
        "nproc",
        "plugin",
    ):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += ["--use-async"] if args.use_async else []
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, check=False).returncode
    return rc, time.perf_counter() - t0


def read_losses(path: Path) -> dict[int, str]:
    return {step: bits for step, bits in (json.loads(line) for line in path.read_text().splitlines())}


def folder_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def compare(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    work = args.workdir
    straight = read_losses(work / "straight" / "losses.jsonl")
    first = read_losses(work / "first" / "losses.jsonl")
    resumed = read_losses(work / "resume" / "losses.jsonl")
    stats_first = json.loads((work / "first" / "stats.json").read_text())
    stats_resume = json.loads((work / "resume" / "stats.json").read_text())
    combined = {s: b for s, b in first.items() if s <= stats_resume["start_step"]} | resumed
    bad_losses = [s for s in straight if combined.get(s) != straight[s]]
    bad_losses += [s for s in first if first[s] != straight.get(s)]
    a = load_file(work / "straight" / "final.safetensors")
    b = load_file(work / "resume" / "final.safetensors")
    bad_weights = sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]
    ckpt = work / "checkpoints" / stats_resume["resumed_from"]
    n_files, n_bytes = folder_bytes(ckpt)
    saves = stats_first["save_s"]
    print(f"uninterrupted run : {len(straight)} steps")
    print(
        f"interrupted run   : died after step {max(first)} (exit code {INTERRUPTED_EXIT_CODE}); "
        f"{len(saves)} checkpoints saved{' (use_async=True)' if args.use_async else ''}, "
        f"the call took {sum(saves) / len(saves):.3f} s on average"
    )
    kept = [p.name for p in CheckpointManager(work / "checkpoints", None).checkpoints()]
    print(f"checkpoint        : {ckpt.name} ({n_files} files, {n_bytes / 1024:.1f} KiB)")
    print(f"rotation          : {len(saves)} saved, the newest {len(kept)} kept (keep_last={args.keep_last}): {kept}")
    print(
        f"resumed run       : new process, manager.resume() in {stats_resume['load_s']:.3f} s, "
        f"steps {stats_resume['start_step'] + 1}..{stats_resume['steps']}"
    )
    print(f"losses            : {len(straight) - len(set(bad_losses))}/{len(straight)} bit-identical")
    print(f"final weights     : {len(a) - len(bad_weights)}/{len(a)} tensors bit-identical")
    bad_one_rank = check_final_on_one_rank(args, a)
    print(
        f"on 1 rank         : the resumed run's last checkpoint (saved on {args.nproc} ranks, plugin {args.plugin}) "
        f"loaded in this process: {len(a) - len(bad_one_rank)}/{len(a)} tensors equal the uninterrupted run's"
    )
    bad_weights += bad_one_rank
    same = not bad_losses and not bad_weights and len(combined) == len(straight)
    if not same:
        print(f"DIFFERENCE: losses at steps {sorted(set(bad_losses))[:10]}, weights {bad_weights[:10]}")
    print("RESULT:", "resumed run matches the uninterrupted run exactly" if same else "MISMATCH")
    return 0 if same else 1


def check_final_on_one_rank(args: argparse.Namespace, reference: dict[str, torch.Tensor]) -> list[str]:
    """Load the final training checkpoint of the resumed run in this one process (a world of
    one, no plugin) and return the names of weights that differ from ``reference``."""
    import warnings

    ckpt = CheckpointManager(args.workdir / "final", None).latest()
    if ckpt is None:
        return ["<no final checkpoint>"]
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "saved on N ranks, loaded on 1": expected here
        load_checkpoint(ckpt, Booster(), model, None, None, restore_rng=False)
    got = model.state_dict()
    return sorted(set(got) ^ set(reference)) + [
        k for k in reference if k in got and not torch.equal(got[k], reference[k])
    ]


def orchestrate(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="ckptio-demo-") as tmp:
        args.workdir = args.workdir or Path(tmp)
        for phase, expected in (("straight", 0), ("first", INTERRUPTED_EXIT_CODE), ("resume", 0)):
            rc, seconds = run_phase(args, phase)
            print(f"[{phase:8s}] process exited with code {rc} after {seconds:.1f} s")
            if rc != expected:
                print(f"phase {phase} failed (exit code {rc}, expected {expected})", file=sys.stderr)
                return 1
        return compare(args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=("all", "straight", "first", "resume"), default="all")
    parser.add_argument("--workdir", type=Path, default=None, help="keep every file here (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=192, help="samples per rank (steps do not depend on --nproc)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per run (one process each)")
    parser.add_argument("--plugin", choices=("fsdp", "ddp", "none"), default="fsdp", help="parallel layout")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--keep-last", type=int, default=2, help="checkpoints the manager keeps")
    parser.add_argument("--use-async", action="store_true", help="checkpoint with use_async=True (overlaps training)")
    parser.add_argument("--interrupt-at", type=int, default=22, help="global step after which the run dies")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.nproc < 1 or (args.plugin == "none" and args.nproc != 1):
        parser.error("--nproc must be >= 1, and 1 with --plugin none")
    if args.interrupt_at < args.save_every:
        parser.error("--interrupt-at must come after the first checkpoint (--save-every)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase == "all":
        return orchestrate(args)
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
