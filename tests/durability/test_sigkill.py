"""SIGKILL a process while it saves a few hundred MB, again and again: the newest checkpoint
that ``CheckpointManager.latest()`` returns always loads (checksums verified) and equals one
whole state that was saved, never a mix and never something half-written.

Every saved state is recognisable: tensor number ``i`` (model weights, then Adam's two state
tensors per parameter) holds the constant ``c + i``, where ``c`` is the save's own value. One
``c`` across all tensors proves the files come from one save; ``c`` tells which save. Each odd
step is saved twice (``c = step``, then ``c = step + 0.5``), so kills also land while an
existing folder is being replaced.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptio import Booster, CheckpointManager
from ckptio.formats.naming import TMP_MARK

KILLS = 22
WIDTH, LAYERS = 1024, 24  # 24 x 1024 x 1024 fp32 = 96 MiB of weights, 288 MiB with Adam's state


def build():
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():  # create Adam's state without spending time on a real step
        optimizer.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.empty_like(p),
            "exp_avg_sq": torch.empty_like(p),
        }
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    return booster, model, optimizer


def tensors_in_order(model, optimizer) -> list[torch.Tensor]:
    params = list(model.parameters())
    state = [optimizer.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
    return [p.data for p in params] + state


def fill(model, optimizer, c: float) -> None:
    with torch.no_grad():
        for i, t in enumerate(tensors_in_order(model, optimizer)):
            t.fill_(c + i)


def saver(save_dir: str, first_step: int, use_async: bool) -> None:
    """Save forever (until killed): each step once, odd steps a second time over the same folder."""
    torch.set_num_threads(1)
    booster, model, optimizer = build()
    # each restart starts over in the killed runs' folder: its first commit replaces their checkpoints
    manager = CheckpointManager(save_dir, booster, keep_last=2, discard_existing=True)
    step = first_step
    while True:
        values = (step, step + 0.5) if step % 2 else (step,)
        for c in values:
            fill(model, optimizer, float(c))
            # force: a re-save of the same step must replace the folder
            manager.save(model, optimizer, None, 0, step, 1, use_async=use_async, force=True)
        step += 1


def check_latest(save_dir: Path) -> float | None:
    """Load what latest() returns, verified; return the save's value c, or None if there is none yet."""
    booster, model, optimizer = build()
    fill(model, optimizer, -1.0)
    manager = CheckpointManager(save_dir, booster)
    path = manager.latest()
    if path is None:
        return None
    assert manager.resume(model, optimizer, None, verify=True, restore_rng=False) is not None
    step = int(path.name.split("_step-")[1])
    tensors = tensors_in_order(model, optimizer)
    c = float(tensors[0].flatten()[0])
    assert c in (step, step + 0.5), (path, c)
    for i, t in enumerate(tensors):
        assert torch.equal(t, torch.full_like(t, c + i)), (path, i)
    return c


@pytest.mark.slow
def test_sigkill_at_random_moments_never_exposes_a_partial_checkpoint(tmp_path):
    rng = random.Random(1234)
    ctx = mp.get_context("fork")
    seen: list[float] = []
    mid_save = 0
    for run in range(KILLS):
        use_async = run % 3 == 2  # a third of the runs save with use_async=True
        proc = ctx.Process(target=saver, args=(str(tmp_path), 1000 * (run + 1), use_async), daemon=True)
        proc.start()
        time.sleep(rng.uniform(0.4, 2.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        mid_save += any(TMP_MARK in p.name for p in tmp_path.iterdir())
        c = check_latest(tmp_path)
        if c is not None:
            assert not seen or c >= seen[-1] or c // 1000 > seen[-1] // 1000, (c, seen)  # never goes back
            seen.append(c)
    assert len(seen) >= KILLS // 2, f"too few runs got a checkpoint committed: {seen}"
    assert mid_save >= 5, f"only {mid_save} of {KILLS} kills hit a save in progress"
    # the next save cleans up whatever the kills left behind
    booster, model, optimizer = build()
    fill(model, optimizer, 7.0)
    CheckpointManager(tmp_path, booster, keep_last=2, discard_existing=True).save(model, optimizer, None, 99, 7, 1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert check_latest(tmp_path) == 7.0
