"""Training folders of transformers.Trainer and accelerate, written by the real tools here, loaded
by ``load_checkpoint`` and ``CheckpointManager.resume``: every part exactly as saved, and the
run continues as the tool would have continued it."""

from __future__ import annotations

import os
import random
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.training.foreign_runs import tiny, train_step, trainer_objects, trainer_run

from ckptio import Booster, CheckpointManager, StateMismatchError, UnsafeCheckpointError
from ckptio.errors import CheckpointFormatError
from ckptio.training import load_checkpoint
from ckptio.training.foreign import hf_trainer_position


@pytest.fixture(scope="module")
def trainer_out(tmp_path_factory):
    return trainer_run(tmp_path_factory.mktemp("trainer") / "out")


def _assert_equal_state(got, want, where=""):
    """Nested state dicts (tensors, numbers, lists) equal exactly, tensors by torch.equal."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            _assert_equal_state(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_equal_state(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def _fresh():
    model = tiny()
    optimizer, scheduler = trainer_objects(model)
    return Booster(), model, optimizer, scheduler


def test_trainer_checkpoint_loads_exactly_and_the_run_continues_bit_exact(trainer_out):
    folder = trainer_out / "checkpoint-6"  # epoch 1.5: 4 steps an epoch, 2 done in the second
    booster, model, optimizer, scheduler = _fresh()
    assert load_checkpoint(folder, booster, model, optimizer, scheduler) == (1, 2, 4)  # 2 steps x batch of 2

    _assert_equal_state(model.state_dict(), load_file(folder / "model.safetensors"))
    _assert_equal_state(optimizer.state_dict(), torch.load(folder / "optimizer.pt", weights_only=True))
    saved_scheduler = torch.load(folder / "scheduler.pt", weights_only=True)
    _assert_equal_state({k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
                        {k: v for k, v in saved_scheduler.items() if k != "lr_lambdas"})  # fmt: skip
    rng = torch.load(folder / "rng_state.pth", weights_only=False)
    assert torch.equal(torch.get_rng_state(), rng["cpu"]) and random.getstate() == rng["python"]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), rng["numpy"]))

    for _ in range(2):  # steps 7 and 8, as the Trainer took them
        train_step(model, optimizer, scheduler)
    last = trainer_out / "checkpoint-8"
    _assert_equal_state(model.state_dict(), load_file(last / "model.safetensors"))
    _assert_equal_state(optimizer.state_dict(), torch.load(last / "optimizer.pt", weights_only=True))


def test_manager_resumes_a_trainer_output_folder_then_saves_its_own(trainer_out, tmp_path):
    run = tmp_path / "out"
    shutil.copytree(trainer_out, run)
    booster, model, optimizer, scheduler = _fresh()
    manager = CheckpointManager(run, booster, keep_last=1)
    assert manager.resume(model, optimizer, scheduler) == (2, 0, 0)  # checkpoint-8, the newest: 2 epochs done
    _assert_equal_state(model.state_dict(), load_file(run / "checkpoint-8" / "model.safetensors"))
    manager.save(model, optimizer, scheduler, 2, 0, 2)
    manager.save(model, optimizer, scheduler, 2, 1, 2)  # rotation keeps 1 of ours, never the Trainer's
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-3", "checkpoint-6", "checkpoint-8", "epoch-2_step-1"]
    again = _fresh()
    assert CheckpointManager(run, again[0]).resume(*again[1:]) == (2, 1, 2)  # ours first, once there are any


def test_a_misfit_or_a_pickle_with_code_is_refused_before_anything_changes(trainer_out, tmp_path):
    folder = tmp_path / "checkpoint-6"
    shutil.copytree(trainer_out / "checkpoint-6", folder)
    booster, model, _, _ = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one_group = torch.optim.AdamW(model.parameters(), lr=5e-5)  # Trainer's optimizer has two groups
    with pytest.raises(StateMismatchError, match="optimizer.pt"):
        load_checkpoint(folder, booster, model, one_group, None)
    _assert_equal_state(model.state_dict(), before)
    assert one_group.state == {}

    rng = torch.load(folder / "rng_state.pth", weights_only=False)
    torch.save({**rng, "python": os.system}, folder / "rng_state.pth")  # a global: code, not data
    optimizer, scheduler = trainer_objects(model)
    torch_state = torch.get_rng_state()
    with pytest.raises(UnsafeCheckpointError, match="rng_state.pth"):
        load_checkpoint(folder, booster, model, optimizer, scheduler)
    _assert_equal_state(model.state_dict(), before)
    assert optimizer.state == {} and scheduler.last_epoch == 0 and torch.equal(torch.get_rng_state(), torch_state)

    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):  # what save_only_model=True leaves
        (folder / name).unlink()
    with pytest.raises(StateMismatchError, match="no optimizer state.*optimizer=None"):
        load_checkpoint(folder, booster, model, optimizer, None)
    with pytest.warns(UserWarning, match="RNG state file is missing"):
        assert load_checkpoint(folder, booster, model, None, None) == (1, 2, 4)


def test_accelerate_save_state_loads_exactly_and_the_run_continues_bit_exact(tmp_path):
    from accelerate import Accelerator

    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for _ in range(2):
        train_step(model, optimizer, scheduler)
    accelerator.save_state(tmp_path / "state")
    assert sorted(os.listdir(tmp_path / "state")) == [
        "model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.bin",
    ]  # fmt: skip
    after_save = torch.rand(3)  # what the run draws next

    fresh = tiny()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_scheduler = torch.optim.lr_scheduler.StepLR(fresh_optimizer, 1, 0.5)
    with pytest.warns(UserWarning, match="records no epoch, step or sample position"):
        position = load_checkpoint(tmp_path / "state", Booster(), fresh, fresh_optimizer, fresh_scheduler)
    assert position == (0, 0, 0)
    assert torch.equal(torch.rand(3), after_save)  # the RNG is back where the save left it
    _assert_equal_state(fresh.state_dict(), model.state_dict())
    _assert_equal_state(fresh_optimizer.state_dict(), optimizer.state_dict())
    _assert_equal_state(fresh_scheduler.state_dict(), scheduler.state_dict())
    train_step(model, optimizer, scheduler)
    train_step(fresh, fresh_optimizer, fresh_scheduler)
    _assert_equal_state(fresh.state_dict(), model.state_dict())

    # automatic_checkpoint_naming's checkpoints/checkpoint_<i>: a manager takes the highest
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(tmp_path / "state", tmp_path / "checkpoints" / "checkpoint_1")
    with pytest.warns(UserWarning, match="records no epoch"):
        assert CheckpointManager(tmp_path / "checkpoints", Booster()).resume(tiny(), None, None) == (0, 0, 0)


@pytest.mark.parametrize(
    ("state", "position"),
    [
        ({"global_step": 3, "epoch": 0.75, "train_batch_size": 2}, (0, 3, 6)),  # first epoch: every step
        ({"global_step": 8, "epoch": 2.0, "train_batch_size": 2}, (2, 0, 0)),  # at an epoch's end
        ({"global_step": 1000, "epoch": 2.5, "train_batch_size": 8}, (2, 200, 1600)),  # 400 steps an epoch
    ],
)
def test_trainer_position(state, position):
    assert hf_trainer_position(state, path="trainer_state.json") == position


def test_trainer_position_without_batch_size_or_with_a_bad_step():
    notes: list[str] = []
    assert hf_trainer_position({"global_step": 5, "epoch": 0.5}, path="t.json", notes=notes) == (0, 5, 0)
    assert "no train_batch_size" in notes[0]
    with pytest.raises(CheckpointFormatError, match="t.json: global_step"):
        hf_trainer_position({"global_step": "5", "epoch": 0.5}, path="t.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf_trainer_position({"global_step": 0, "epoch": 0, "train_batch_size": 4}, path="t.json") == (0, 0, 0)
