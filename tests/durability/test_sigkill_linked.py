"""SIGKILL while a save links unchanged files from the previous checkpoint, while rotation deletes
a checkpoint whose files later ones share, and at random moments: every checkpoint left visible
is complete (checksums verified) and loads to exactly the state it saved.

The model is half frozen, so every save after the first links the frozen shards (one per
tensor) from the newest checkpoint: frozen tensor ``i`` always holds ``100 + i``; trained tensor
``j`` and its Adam state hold ``c + j``, ``c`` the save's step, so a mix of two saves shows.
Each run starts over in the killed runs' folder (``discard_existing=True``): its first save
links from their checkpoints, and its rotation deletes them while its own share their inodes.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import torch
from torch import nn

import ckptio.storage.atomic as atomic
import ckptio.storage.local as local
from ckptio import Booster, CheckpointManager
from ckptio.formats.naming import DELETE_MARK, TMP_MARK
from ckptio.tools import verify_checkpoint
from ckptio.training import load_checkpoint

WIDTH, LAYERS, FROZEN = 128, 6, 3  # 64 KiB a tensor, one shard each
SHARD_MIB = 0.07


def build():
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)))
    trained = list(model.parameters())[FROZEN:]
    with torch.no_grad():
        for i, p in enumerate(list(model.parameters())[:FROZEN]):
            p.requires_grad_(False)
            p.fill_(100.0 + i)
    optimizer = torch.optim.Adam(trained, lr=1e-3)
    for p in trained:  # Adam's state without a real step
        state = {"exp_avg": p.detach().clone(), "exp_avg_sq": p.detach().clone()}
        optimizer.state[p] = {"step": torch.tensor(1.0), **state}
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    return booster, model, optimizer


def trained_tensors(model, optimizer) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [p.data for p in params] + [optimizer.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]


def _kill_on(calls: int):
    """A wrapper of ``fn`` that SIGKILLs this process on its ``calls``-th call, after ``fn`` ran."""

    def wrap(fn, before=None):
        count = itertools.count(1)  # thread-safe: the save's writer threads call fn at once

        def wrapped(*args, **kwargs):
            call = next(count)  # this call's own number (a shared counter read back could skip it)
            if call == calls and before is not None:
                before(*args)
                os.kill(os.getpid(), signal.SIGKILL)
            out = fn(*args, **kwargs)
            if call == calls:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        return wrapped

    return wrap


def _half_deleted(path) -> None:
    """Rotation's rmtree cut short: some files of the doomed folder gone, the rest still there."""
    path = Path(path)
    if DELETE_MARK in path.name:
        for i, f in enumerate(sorted(p for p in path.rglob("*") if p.is_file())):
            if i % 2:
                f.unlink()


def saver(save_dir: str, first_step: int, kill: str, calls: int) -> None:
    torch.set_num_threads(1)
    if kill == "link":  # mid-save: some unchanged files linked into the staging folder, not all
        local.link_file = _kill_on(calls)(local.link_file)
    elif kill == "rotation":  # rotation deleting a checkpoint whose files the kept ones share
        original = atomic._remove
        atomic._remove = _kill_on(calls)(original, before=_half_deleted)
        atomic._remove = _only_doomed(atomic._remove, original)
    booster, model, optimizer = build()
    manager = CheckpointManager(save_dir, booster, keep_last=2, discard_existing=True)
    step = first_step
    while True:
        with torch.no_grad():
            for j, t in enumerate(trained_tensors(model, optimizer)):
                t.fill_(step + j)
        manager.save(model, optimizer, None, 0, step, 1, size_per_shard=SHARD_MIB)
        step += 1


def _only_doomed(counting, original):
    """Count (and kill on) removals of folders marked for deletion only."""

    def remove(path):
        return counting(path) if DELETE_MARK in Path(path).name else original(path)

    return remove


def check_every_visible_checkpoint(save_dir: Path) -> int:
    found = 0
    for path in sorted(save_dir.glob("epoch-*")):  # what a reader sees (staging and doomed folders are hidden)
        assert verify_checkpoint(path)[1] == [], path
        booster, model, optimizer = build()
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(-1.0)
        load_checkpoint(path, booster, model, optimizer, None, verify=True, restore_rng=False)
        step = int(path.name.split("_step-")[1])
        for i, p in enumerate(list(model.parameters())[:FROZEN]):
            assert torch.equal(p, torch.full_like(p, 100.0 + i)), (path, i)
        for j, t in enumerate(trained_tensors(model, optimizer)):
            assert torch.equal(t, torch.full_like(t, float(step + j))), (path, j)
        found += 1
    return found


def test_sigkill_while_linking_while_rotating_and_at_random_never_breaks_a_visible_checkpoint(tmp_path):
    ctx = mp.get_context("fork")
    rng = random.Random(7)
    # link: the 3rd save's 2nd link (frozen shards are linked from the 2nd save on: 3 a save)
    # rotation: the 1st deletion (3rd save: keep_last=2), or of the killed runs' checkpoints (discard_existing)
    runs = [("link", FROZEN + 2), ("rotation", 1), ("link", 1), ("rotation", 2), ("random", 0)]
    for n, (kill, calls) in enumerate(runs):
        proc = ctx.Process(target=saver, args=(str(tmp_path), 1000 * (n + 1), kill, calls), daemon=True)
        proc.start()
        if kill == "random":
            time.sleep(rng.uniform(0.5, 2.0))
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(60)
        assert proc.exitcode == -signal.SIGKILL, (kill, proc.exitcode)
        left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        if kill == "link":  # killed mid-save: its staging folder, holding links, was never committed
            assert any(TMP_MARK in name for name in left), left
        elif kill == "rotation":  # killed mid-deletion: the half-deleted folder is hidden, never restored
            assert any(DELETE_MARK in name for name in left), left
        assert check_every_visible_checkpoint(tmp_path) >= 1, (kill, sorted(os.listdir(tmp_path)))
    # the next save clears what the kills left, and links from the survivors
    booster, model, optimizer = build()
    with torch.no_grad():
        for j, t in enumerate(trained_tensors(model, optimizer)):
            t.fill_(9000.0 + j)
    path = CheckpointManager(tmp_path, booster, keep_last=2, discard_existing=True).save(
        model, optimizer, None, 0, 9000, 1, size_per_shard=SHARD_MIB
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert "reused" in (path / "ckptio_manifest.json").read_text()
    assert check_every_visible_checkpoint(tmp_path) == 1
