"""CheckpointManager: rotation after commit, latest() skipping damaged folders, resume with fallback."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from ckptio import Booster, CheckpointManager


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)
    booster = Booster()
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, None, None, scheduler)
    return booster, model, optimizer, scheduler


def train(model, optimizer, scheduler, n: int = 1) -> None:
    for _ in range(n):
        optimizer.zero_grad()
        model(torch.randn(4, 6)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_rotation_keeps_last_and_every(tmp_path):
    booster, model, optimizer, scheduler = setup()
    manager = CheckpointManager(tmp_path, booster, keep_last=2, keep_every=4, save_every=2)
    written = []
    for step in range(1, 11):
        train(model, optimizer, scheduler)
        path = manager.save(model, optimizer, scheduler, 0, step, 8)
        assert (path is not None) == (step % 2 == 0)
        if path is not None:
            written.append(path.name)
    assert written == [f"epoch-0_step-{s}" for s in (2, 4, 6, 8, 10)]
    # the newest two, plus every multiple of 4 (never rotated away); no temporaries
    assert names(tmp_path) == ["epoch-0_step-10", "epoch-0_step-4", "epoch-0_step-8"]
    assert manager.latest() == tmp_path / "epoch-0_step-10"
    assert manager.save(model, optimizer, scheduler, 0, 11, 8, force=True) == tmp_path / "epoch-0_step-11"


def test_latest_orders_by_epoch_then_step_not_by_name_or_time(tmp_path):
    booster, model, optimizer, scheduler = setup()
    manager = CheckpointManager(tmp_path, booster, keep_last=None)
    for epoch, step in ((0, 100), (1, 5), (0, 99)):
        manager.save(model, optimizer, scheduler, epoch, step, 1)
    assert manager.latest() == tmp_path / "epoch-1_step-5"
    assert [p.name for p in manager.checkpoints()] == ["epoch-0_step-99", "epoch-0_step-100", "epoch-1_step-5"]


def test_resume_restores_the_newest_state_exactly(tmp_path):
    booster, model, optimizer, scheduler = setup()
    manager = CheckpointManager(tmp_path, booster)
    assert manager.latest() is None
    b2, m2, o2, s2 = setup(seed=1)
    assert CheckpointManager(tmp_path, b2).resume(m2, o2, s2) is None
    for step in (1, 2, 3):
        train(model, optimizer, scheduler)
        manager.save(model, optimizer, scheduler, 1, step, 4)
    expected = snapshot(model)
    assert CheckpointManager(tmp_path, b2).resume(m2, o2, s2, verify=True) == (1, 3, 12)
    for k, v in snapshot(m2).items():
        assert torch.equal(v, expected[k]), k
    assert s2.state_dict() == scheduler.state_dict()
    assert o2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_damaged_newest_is_skipped_for_the_previous_one(tmp_path):
    booster, model, optimizer, scheduler = setup()
    manager = CheckpointManager(tmp_path, booster, keep_last=3)
    states = {}
    for step in (1, 2, 3):
        train(model, optimizer, scheduler)
        manager.save(model, optimizer, scheduler, 0, step, 1)
        states[step] = snapshot(model)
    # step 3: a truncated shard (caught by the size check); step 2: one flipped byte (caught by verify=True)
    shard3 = next((tmp_path / "epoch-0_step-3" / "modeling").glob("*.safetensors"))
    os.truncate(shard3, shard3.stat().st_size - 7)
    shard2 = next((tmp_path / "epoch-0_step-2" / "modeling").glob("*.safetensors"))
    data = bytearray(shard2.read_bytes())
    data[-3] ^= 0x40
    shard2.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="epoch-0_step-3"):
        assert manager.latest() == tmp_path / "epoch-0_step-2"  # sizes only: the flipped byte is not seen here
    b2, m2, o2, s2 = setup(seed=5)
    with pytest.warns(UserWarning) as caught:
        assert CheckpointManager(tmp_path, b2).resume(m2, o2, s2, verify=True) == (0, 1, 1)
    messages = " ".join(str(w.message) for w in caught)
    assert "epoch-0_step-3" in messages and "epoch-0_step-2" in messages and "checksum" in messages
    for k, v in snapshot(m2).items():
        assert torch.equal(v, states[1][k]), k


def test_leftovers_of_a_crashed_save_are_never_latest_and_are_cleaned(tmp_path):
    booster, model, optimizer, scheduler = setup()
    manager = CheckpointManager(tmp_path, booster)
    manager.save(model, optimizer, scheduler, 0, 1, 1)
    # what a save killed mid-way leaves: a staging folder of a later step, with some files in it
    staging = tmp_path / ".epoch-0_step-2.ckptio-tmp-0123456789ab"
    (staging / "modeling").mkdir(parents=True)
    (staging / "modeling" / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 100)
    (tmp_path / "epoch-0_step-9").mkdir()  # a folder with the right name but no running_states.json
    with pytest.warns(UserWarning, match="epoch-0_step-9"):
        assert manager.latest() == tmp_path / "epoch-0_step-1"
    manager.save(model, optimizer, scheduler, 0, 3, 1)
    assert not staging.exists()
    with pytest.warns(UserWarning, match="epoch-0_step-9"):
        assert manager.latest() == tmp_path / "epoch-0_step-3"


def test_async_save_rotates_only_once_durable(tmp_path):
    booster, model, optimizer, scheduler = setup()
    manager = CheckpointManager(tmp_path, booster, keep_last=1)
    manager.save(model, optimizer, scheduler, 0, 1, 1, use_async=True)
    manager.wait()
    train(model, optimizer, scheduler)
    expected = snapshot(model)
    manager.save(model, optimizer, scheduler, 0, 2, 1, use_async=True)
    with torch.no_grad():  # training goes on at once
        for p in model.parameters():
            p.add_(1.0)
    # until the new one is durable and rotation ran, the old one is still there
    assert (tmp_path / "epoch-0_step-1").is_dir() or (tmp_path / "epoch-0_step-2").is_dir()
    manager.wait()
    assert names(tmp_path) == ["epoch-0_step-2"]
    b2, m2, o2, s2 = setup(seed=3)
    assert CheckpointManager(tmp_path, b2).resume(m2, o2, s2, verify=True) == (0, 2, 2)
    for k, v in snapshot(m2).items():
        assert torch.equal(v, expected[k]), k


def test_bad_arguments(tmp_path):
    booster = Booster()
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, booster, keep_last=0)
    with pytest.raises(ValueError, match="URL"):
        CheckpointManager("s3://bucket/run", booster)
