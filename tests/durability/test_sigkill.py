"""SIGKILL a process while it saves a few hundred MB, again and again: the newest checkpoint
that ``CheckpointManager.latest()`` returns always loads (checksums verified) and equals one
whole state that was saved, never a mix and never something half-written.

Every saved state is recognisable: tensor number ``i`` (model weights, then Adam's two state
tensors per parameter) holds the constant ``c + i``, where ``c`` is the save's own value. One
``c`` across all tensors proves the files come from one save; ``c`` tells which save. Each odd
step is saved twice (``c = step``, then ``c = step + 0.5``), so kills also land while an
existing folder is being replaced.

Half the runs save with ``use_async=True`` and change the state right after each call, while
the background copy may still be reading it: through the boosted optimizer's ``step()`` (which
waits only for the copy of what it modifies), or in place after ``booster.wait_staged()``. A
checkpoint holding a later state than its call's shows up as the wrong ``c`` (or a mix).
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


class FillAdam(torch.optim.Adam):
    """Adam whose ``step()`` writes ``next_value`` into the state (weights and moments): training
    changing the state through the optimizer, the moment an async save's call returns."""

    next_value = 0.0

    def step(self, closure=None):
        fill_tensors(tensors_in_order(self), self.next_value)


def build():
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)))
    optimizer = FillAdam(model.parameters(), lr=1e-3)
    for p in model.parameters():  # create Adam's state without spending time on a real step
        optimizer.state[p] = {
            "step": torch.tensor(1.0),
            "exp_avg": torch.empty_like(p),
            "exp_avg_sq": torch.empty_like(p),
        }
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    return booster, model, optimizer


def tensors_in_order(optimizer) -> list[torch.Tensor]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = [optimizer.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
    return params + state


def fill_tensors(tensors: list[torch.Tensor], c: float) -> None:
    """Last tensor first: a background copy (first tensor first) that raced with it would meet
    the new values at once, and keep a mix."""
    with torch.no_grad():
        for i, t in reversed(list(enumerate(tensors))):
            t.fill_(c + i)


def fill(optimizer, c: float) -> None:
    fill_tensors(tensors_in_order(optimizer), c)


def saver(save_dir: str, first_step: int, use_async: bool) -> None:
    """Save forever (until killed): each step once, odd steps a second time over the same folder."""
    torch.set_num_threads(1)
    booster, model, optimizer = build()
    # each restart starts over in the killed runs' folder: its first commit replaces their checkpoints
    manager = CheckpointManager(save_dir, booster, keep_last=2, discard_existing=True)
    values = [c for step in range(first_step, first_step + 999) for c in ((step, step + 0.5) if step % 2 else (step,))]
    fill(optimizer, float(values[0]))
    for n, c in enumerate(values):
        # force: a re-save of the same step must replace the folder
        manager.save(model, optimizer, None, 0, int(c), 1, use_async=use_async, force=True)
        following = float(values[n + 1])
        if use_async and n % 2 == 0:
            optimizer.next_value = following  # at once: step() waits for the copy of what it writes
            optimizer.step()
        else:
            if use_async:
                booster.wait_staged()  # a change outside step() waits for the copy first
            fill(optimizer, following)


def check_latest(save_dir: Path) -> float | None:
    """Load what latest() returns, verified; return the save's value c, or None if there is none yet."""
    booster, model, optimizer = build()
    fill(optimizer, -1.0)
    manager = CheckpointManager(save_dir, booster)
    path = manager.latest()
    if path is None:
        return None
    assert manager.resume(model, optimizer, None, verify=True, restore_rng=False) is not None
    step = int(path.name.split("_step-")[1])
    tensors = tensors_in_order(optimizer)
    c = float(tensors[0].detach().flatten()[0])
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
        use_async = run % 2 == 1  # half the runs save with use_async=True
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
    fill(optimizer, 7.0)
    CheckpointManager(tmp_path, booster, keep_last=2, discard_existing=True).save(model, optimizer, None, 99, 7, 1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert check_latest(tmp_path) == 7.0
