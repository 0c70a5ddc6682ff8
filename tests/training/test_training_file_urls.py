"""``file:///abs/path`` means ``/abs/path`` for training checkpoints and ``CheckpointManager``."""

from __future__ import annotations

import torch
from torch import nn

from ckptio import Booster, CheckpointManager
from ckptio.training import load_checkpoint, save_checkpoint


def _setup(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)
    booster = Booster()
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, None, None, scheduler)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return booster, model, optimizer, scheduler


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_save_and_load_checkpoint_through_file_urls(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    runs = tmp_path / "runs"
    booster, model, optimizer, scheduler = _setup(0)
    path = save_checkpoint(f"file://{runs}", booster, model, optimizer, scheduler, 1, 3, 8)
    assert (runs / "epoch-1_step-3" / "running_states.json").is_file()
    assert str(path) == str(runs / "epoch-1_step-3")
    _, fresh, fresh_opt, fresh_sched = _setup(1)
    resumed = load_checkpoint(f"file://{runs}/epoch-1_step-3", booster, fresh, fresh_opt, fresh_sched)
    assert resumed == (1, 3, 24)
    assert _same(model, fresh)
    assert list(cwd.iterdir()) == []


def test_checkpoint_manager_through_a_file_url(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    runs = tmp_path / "runs"
    booster, model, optimizer, scheduler = _setup(0)
    manager = CheckpointManager(f"file://{runs}", booster, keep_last=1)
    manager.save(model, optimizer, scheduler, 0, 1, 4)
    manager.save(model, optimizer, scheduler, 0, 2, 4)
    assert sorted(p.name for p in runs.iterdir()) == ["epoch-0_step-2"]
    assert manager.latest() == runs / "epoch-0_step-2"
    _, fresh, fresh_opt, fresh_sched = _setup(1)
    assert CheckpointManager(f"file://{runs}", booster).resume(fresh, fresh_opt, fresh_sched) == (0, 2, 8)
    assert _same(model, fresh)
    assert list(cwd.iterdir()) == []
