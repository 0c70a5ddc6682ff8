"""CheckpointManager: rotation after commit, latest() skipping damaged folders, resume with fallback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptio import Booster, CheckpointExistsError, CheckpointManager, StateMismatchError
from ckptio.tools.verify import verify_path
from ckptio.training import load_checkpoint, save_checkpoint


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
    booster.wait_staged()  # a change outside optimizer.step() waits for the copy
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


# ---------------------------------------------------------------- whose checkpoints these are


def wide_setup(seed: int = 7):
    """The same training script after a config change: a wider hidden layer."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)
    booster = Booster()
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, None, None, scheduler)
    return booster, model, optimizer, scheduler


def manifests(folder) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(folder.glob("*/ckptio_manifest.json"))}


def test_resume_raises_when_the_checkpoint_does_not_fit_instead_of_starting_over(tmp_path):
    booster, model, optimizer, scheduler = setup()
    manager = CheckpointManager(tmp_path, booster)
    for step in (1, 2):
        train(model, optimizer, scheduler)
        manager.save(model, optimizer, scheduler, 0, step, 4)
    b2, wide, o2, s2 = wide_setup()
    before = snapshot(wide)
    with pytest.raises(StateMismatchError, match=r"epoch-0_step-2.*does not fit.*0\.weight") as info:
        CheckpointManager(tmp_path, b2).resume(wide, o2, s2)
    assert "save_dir" in str(info.value)  # says how to start afresh instead
    assert all(torch.equal(v, before[k]) for k, v in snapshot(wide).items())
    assert names(tmp_path) == ["epoch-0_step-1", "epoch-0_step-2"]


def test_a_fresh_run_refuses_to_overwrite_another_runs_checkpoints(tmp_path):
    booster, model, optimizer, scheduler = setup()
    old_run = CheckpointManager(tmp_path, booster, keep_last=2)
    for step in (5, 6):
        train(model, optimizer, scheduler)
        old_run.save(model, optimizer, scheduler, 0, step, 4)
    kept = manifests(tmp_path)

    b2, m2, o2, s2 = setup(seed=1)
    new_run = CheckpointManager(tmp_path, b2, keep_last=2)  # no resume(): a fresh start in the same folder
    for step in (1, 6):  # rotation would delete step 1 first; step 6 would replace the old run's step 6
        with pytest.raises(CheckpointExistsError) as info:
            new_run.save(m2, o2, s2, 0, step, 4)
        message = str(info.value)
        assert str(tmp_path) in message and "epoch-0_step-5" in message and "epoch-0_step-6" in message
        assert "resume" in message and "discard_existing=True" in message
    assert names(tmp_path) == ["epoch-0_step-5", "epoch-0_step-6"] and manifests(tmp_path) == kept

    # told to: the first committed save replaces the old run, so latest() never mixes the two runs
    fresh = CheckpointManager(tmp_path, b2, keep_last=2, discard_existing=True)
    fresh.save(m2, o2, s2, 0, 1, 4)
    assert names(tmp_path) == ["epoch-0_step-1"]
    fresh.save(m2, o2, s2, 0, 2, 4)
    assert names(tmp_path) == ["epoch-0_step-1", "epoch-0_step-2"]
    assert fresh.latest() == tmp_path / "epoch-0_step-2"

    # the function underneath keeps its contract: it replaces a folder atomically, whoever wrote it
    expected = snapshot(model)
    save_checkpoint(tmp_path, booster, model, optimizer, scheduler, 0, 2, 4)
    b3, m3, o3, s3 = setup(seed=3)
    load_checkpoint(tmp_path / "epoch-0_step-2", b3, m3, o3, s3)
    assert all(torch.equal(v, expected[k]) for k, v in snapshot(m3).items())


def test_a_resumed_run_replaces_and_rotates_its_own_checkpoints_never_the_new_one(tmp_path):
    """Resume from step 2 while a damaged step 4 exists: the resumed run re-saves step 2, saves
    step 3 (keep_last=1 must keep it, not the damaged newer folder) and then replaces step 4."""
    booster, model, optimizer, scheduler = setup()
    manager = CheckpointManager(tmp_path, booster, keep_last=None)
    for step in (1, 2, 4):
        train(model, optimizer, scheduler)
        manager.save(model, optimizer, scheduler, 0, step, 1)
    shard = next((tmp_path / "epoch-0_step-4" / "modeling").glob("*.safetensors"))
    os.truncate(shard, shard.stat().st_size - 5)

    b2, m2, o2, s2 = setup(seed=3)
    resumed = CheckpointManager(tmp_path, b2, keep_last=1)
    with pytest.warns(UserWarning, match="epoch-0_step-4"):
        assert resumed.resume(m2, o2, s2) == (0, 2, 2)
    resumed.save(m2, o2, s2, 0, 2, 1)  # the step it resumed from: replaced in place
    train(m2, o2, s2)
    expected = snapshot(m2)
    resumed.save(m2, o2, s2, 0, 3, 1)
    assert "epoch-0_step-3" in names(tmp_path)
    with pytest.warns(UserWarning, match="epoch-0_step-4"):
        assert resumed.latest() == tmp_path / "epoch-0_step-3"
    b3, m3, o3, s3 = setup(seed=4)
    with pytest.warns(UserWarning, match="epoch-0_step-4"):
        assert CheckpointManager(tmp_path, b3).resume(m3, o3, s3, verify=True) == (0, 3, 3)
    assert all(torch.equal(v, expected[k]) for k, v in snapshot(m3).items())
    resumed.save(m2, o2, s2, 0, 4, 1)
    assert names(tmp_path) == ["epoch-0_step-4"] and resumed.latest() == tmp_path / "epoch-0_step-4"


class _Killed(BaseException):
    """Stands for the process being killed: nothing after it runs."""


def test_a_crash_mid_rotation_never_brings_the_doomed_checkpoint_back(tmp_path, monkeypatch):
    booster, model, optimizer, scheduler = setup()
    manager = CheckpointManager(tmp_path, booster, keep_last=1)
    manager.save(model, optimizer, scheduler, 0, 1, 1)
    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith(".epoch-0_step-1."):  # the doomed folder, renamed aside
            (path / "ckptio_manifest.json").unlink()
            (path / "optimizer" / "optimizer.index.json").unlink()
            raise _Killed
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_mid_delete)
    train(model, optimizer, scheduler)
    with pytest.raises(_Killed):
        manager.save(model, optimizer, scheduler, 0, 2, 1)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    left = names(tmp_path)
    assert left[1:] == ["epoch-0_step-2"] and left[0].startswith(".epoch-0_step-1.")  # the half-deleted folder

    # a new process: readers never see the half-deleted folder, and the next save removes it
    ok, problems = verify_path(str(tmp_path), checksums=True)
    assert problems == [] and any("deletion(s) cut short by a crash, ignored" in line for line in ok), ok
    b2, m2, o2, s2 = setup(seed=2)
    restarted = CheckpointManager(tmp_path, b2, keep_last=1)
    assert restarted.latest() == tmp_path / "epoch-0_step-2"
    assert restarted.resume(m2, o2, s2) == (0, 2, 2)
    assert "epoch-0_step-1" not in names(tmp_path)
    restarted.save(m2, o2, s2, 0, 3, 1)
    assert names(tmp_path) == ["epoch-0_step-3"]
