"""LR scheduler state: a torch.save file that ColossalAI's torch.load (weights_only=True) reads, ColossalAI's
file loads, and the JSON files of earlier ckptio versions still load."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as sched

from ckptio import Booster, CheckpointError
from ckptio.formats import tagged_json as optimizer_json
from ckptio.tools import inspect_checkpoint


class Warmup:
    """A callable object: LambdaLR saves its ``__dict__``."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.steps)


SCHEDULERS = {
    "lambda-fn": lambda o: sched.LambdaLR(o, lambda e: 0.9**e),
    "lambda-obj": lambda o: sched.LambdaLR(o, [Warmup(4), Warmup(6)]),
    "step": lambda o: sched.StepLR(o, step_size=2, gamma=0.5),
    "cosine": lambda o: sched.CosineAnnealingLR(o, T_max=7),
    "onecycle": lambda o: sched.OneCycleLR(o, max_lr=[0.1, 0.2], total_steps=20),
    "linear": lambda o: sched.LinearLR(o, start_factor=0.2, total_iters=5),
    "sequential": lambda o: sched.SequentialLR(
        o, [sched.LinearLR(o, start_factor=0.1, total_iters=3), sched.CosineAnnealingLR(o, T_max=10)], milestones=[3]
    ),
    "chained": lambda o: sched.ChainedScheduler([sched.StepLR(o, 2, 0.9), sched.ExponentialLR(o, 0.95)]),
}


def optimizer() -> torch.optim.Optimizer:
    model = nn.Linear(3, 2)
    return torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.05}], lr=0.1, momentum=0.9)


def stepped(name: str, steps: int = 5):
    opt = optimizer()
    scheduler = SCHEDULERS[name](opt)
    for _ in range(steps):
        opt.step()
        scheduler.step()
    return opt, scheduler


def lrs_after(opt, scheduler, steps: int = 4) -> list[list[float]]:
    out = []
    for _ in range(steps):
        opt.step()
        scheduler.step()
        out.append([g["lr"] for g in opt.param_groups])
    return out


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_round_trip_through_a_file_colossalai_reads(tmp_path, name):
    opt, scheduler = stepped(name)
    booster = Booster()
    booster.save_lr_scheduler(scheduler, tmp_path / "lr_scheduler")
    # ColossalAI's load_lr_scheduler: torch.load (weights_only=True by default since torch 2.6)
    assert torch.load(tmp_path / "lr_scheduler", weights_only=True) == scheduler.state_dict()
    assert inspect_checkpoint(tmp_path / "lr_scheduler")["kind"] == "lr_scheduler"  # the CLI tells it apart
    opt2 = optimizer()
    scheduler2 = SCHEDULERS[name](opt2)  # built first, as in a real resume: it may change the lr ...
    opt2.load_state_dict(opt.state_dict())  # ... which the optimizer's own state then restores
    booster.load_lr_scheduler(scheduler2, tmp_path / "lr_scheduler")
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert lrs_after(opt2, scheduler2) == lrs_after(opt, scheduler)


@pytest.mark.parametrize("name", ["lambda-obj", "sequential", "onecycle"])
def test_colossalai_torch_file_loads(tmp_path, name):
    opt, scheduler = stepped(name)
    torch.save(scheduler.state_dict(), tmp_path / "lr_scheduler")  # what ColossalAI writes
    opt2 = optimizer()
    scheduler2 = SCHEDULERS[name](opt2)  # built first, as in a real resume: it may change the lr ...
    opt2.load_state_dict(opt.state_dict())  # ... which the optimizer's own state then restores
    Booster().load_lr_scheduler(scheduler2, tmp_path / "lr_scheduler")
    assert scheduler2.state_dict() == scheduler.state_dict()


@pytest.mark.parametrize("name", ["lambda-obj", "sequential", "step"])
def test_json_files_of_earlier_versions_still_load(tmp_path, name):
    opt, scheduler = stepped(name)
    body = {
        "format": "ckptio-lr-scheduler",
        "format_version": 1,
        "state": optimizer_json.encode(scheduler.state_dict()),
    }
    (tmp_path / "lr_scheduler").write_text(json.dumps(body, indent=1) + "\n")
    opt2 = optimizer()
    scheduler2 = SCHEDULERS[name](opt2)
    opt2.load_state_dict(opt.state_dict())
    Booster().load_lr_scheduler(scheduler2, tmp_path / "lr_scheduler")
    assert scheduler2.state_dict() == scheduler.state_dict()


def test_state_torch_load_refuses_is_not_saved(tmp_path):
    opt, scheduler = stepped("step")
    booster = Booster()
    scheduler.complex = torch.tensor([1 + 2j])  # part of StepLR's state_dict: tensors are fine
    booster.save_lr_scheduler(scheduler, tmp_path / "sched.pt")
    assert torch.equal(torch.load(tmp_path / "sched.pt", weights_only=True)["complex"], torch.tensor([1 + 2j]))
    scheduler.helper = Warmup(3)  # an object: ColossalAI's torch.load (weights_only=True) would refuse the file
    with pytest.raises(CheckpointError, match="weights_only=True") as info:
        booster.save_lr_scheduler(scheduler, tmp_path / "lr_scheduler")
    assert "lr_scheduler" in str(info.value)
    assert not (tmp_path / "lr_scheduler").exists()


def test_bad_files(tmp_path):
    opt, scheduler = stepped("step")
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="this is a JSON file, not an LR scheduler file"):
        Booster().load_lr_scheduler(scheduler, tmp_path / "bad.json")
    with pytest.raises(CheckpointError, match="does not exist"):
        Booster().load_lr_scheduler(scheduler, tmp_path / "missing")


def test_json_codec_keeps_types():
    value = {
        "betas": (0.9, 0.999),
        "step": torch.tensor(3.0, dtype=torch.float32),
        "count": torch.tensor(5, dtype=torch.int64),
        "lr": torch.tensor([1e-3, 2e-3], dtype=torch.bfloat16),
        "nested": [{"__tuple__": 1}, None, "x", float("inf")],
    }
    encoded = optimizer_json.encode(value)
    back = optimizer_json.decode(json.loads(json.dumps(encoded)))
    assert back["betas"] == (0.9, 0.999) and isinstance(back["betas"], tuple)
    for key in ("step", "count", "lr"):
        assert back[key].dtype == value[key].dtype and torch.equal(back[key], value[key])
    assert back["nested"] == [{"__tuple__": 1}, None, "x", float("inf")]
    with pytest.raises(optimizer_json.NotJSONable):
        optimizer_json.encode({"fn": print})


def _strict_json(text: str):
    """Parse as any JSON parser would: no ``Infinity`` / ``NaN`` tokens."""

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _bits(x: float) -> bytes:
    import struct

    return struct.pack("<d", x)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_plateau_scheduler_with_infinite_best_comes_back_exact(tmp_path, mode):
    opt = optimizer()
    scheduler = sched.ReduceLROnPlateau(opt, mode=mode, patience=1)
    assert scheduler.best in (float("inf"), float("-inf"))  # no metric seen yet
    Booster().save_lr_scheduler(scheduler, tmp_path / "lr_scheduler")
    saved = torch.load(tmp_path / "lr_scheduler", weights_only=True)  # as ColossalAI reads it
    assert _bits(saved["best"]) == _bits(scheduler.best)
    scheduler2 = sched.ReduceLROnPlateau(optimizer(), mode=mode, patience=1)
    scheduler2.best = 0.0
    Booster().load_lr_scheduler(scheduler2, tmp_path / "lr_scheduler")
    assert _bits(scheduler2.best) == _bits(scheduler.best)
    assert scheduler2.state_dict() == scheduler.state_dict()


def test_nan_and_infinities_come_back_bit_exact_in_values_and_tensors():
    import struct

    odd_nan = struct.unpack("<d", struct.pack("<Q", 0xFFF8_0000_0000_0001))[0]  # negative NaN with a payload
    value = {
        "floats": [float("inf"), float("-inf"), float("nan"), odd_nan, -0.0, 1.5],
        "tensor": torch.tensor([float("inf"), float("-inf"), 2.0]),
        "scalar": torch.tensor(float("-inf"), dtype=torch.float64),
    }
    text = json.dumps(optimizer_json.encode(value), allow_nan=False)
    back = optimizer_json.decode(_strict_json(text))
    assert [_bits(x) for x in back["floats"]] == [_bits(x) for x in value["floats"]]
    for key in ("tensor", "scalar"):
        assert back[key].dtype == value[key].dtype and torch.equal(back[key], value[key])


def test_files_written_with_bare_infinity_still_load(tmp_path):
    opt = optimizer()
    scheduler = sched.ReduceLROnPlateau(opt, mode="min")
    state = scheduler.state_dict()
    body = {"format": "ckptio-lr-scheduler", "format_version": 1, "state": optimizer_json.encode(state)}
    body["state"]["best"] = float("inf")  # what the writer produced before infinities were tagged
    (tmp_path / "lr_scheduler").write_text(json.dumps(body, indent=1))
    assert "Infinity" in (tmp_path / "lr_scheduler").read_text()
    scheduler2 = sched.ReduceLROnPlateau(optimizer(), mode="min")
    scheduler2.best = 0.0
    Booster().load_lr_scheduler(scheduler2, tmp_path / "lr_scheduler")
    assert scheduler2.best == float("inf")
