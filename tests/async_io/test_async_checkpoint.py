"""save_checkpoint(use_async=True): the same files as a synchronous save taken at the same moment."""

from __future__ import annotations

from pathlib import Path

import torch

from ckptio import Booster
from ckptio.training import load_checkpoint, save_checkpoint
from tests.async_io.test_async_save import _slow_writes
from tests.helpers import tiny_gpt2


def _train_step(model, optimizer, scheduler):
    model(torch.randint(0, 128, (2, 8)), labels=torch.randint(0, 128, (2, 8))).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_async_training_checkpoint_equals_sync_one(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    booster = Booster()
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, None, None, scheduler)
    _train_step(model, optimizer, scheduler)

    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expected_lr_epoch = scheduler.last_epoch
    sync_dir = save_checkpoint(tmp_path / "sync", booster, model, optimizer, scheduler, 1, 3, 2)
    _slow_writes(monkeypatch)  # the background writer is still busy while training goes on
    async_dir = save_checkpoint(tmp_path / "async", booster, model, optimizer, scheduler, 1, 3, 2, use_async=True)
    assert booster.checkpoint_io.async_saver.in_flight
    for _ in range(2):  # training goes on while the checkpoint is written
        _train_step(model, optimizer, scheduler)
    booster.wait()

    sync_files, async_files = _files(sync_dir), _files(async_dir)
    assert sorted(sync_files) == sorted(async_files)
    for name, body in sync_files.items():
        if name != "ckptio_manifest.json":
            assert async_files[name] == body, name
    assert not [p for p in (tmp_path / "async").iterdir() if p.name.startswith(".")]  # committed, no staging left

    model2 = tiny_gpt2(seed=5)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    scheduler2 = torch.optim.lr_scheduler.StepLR(optimizer2, step_size=1, gamma=0.5)
    assert load_checkpoint(async_dir, booster, model2, optimizer2, scheduler2, verify=True) == (1, 3, 6)
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in expected.items())
    assert scheduler2.last_epoch == expected_lr_epoch != scheduler.last_epoch
