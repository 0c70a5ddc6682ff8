"""Objects with state_dict()/load_state_dict() (a GradScaler, an EMA of the weights, a data loader's
position) travel with training checkpoints: tensors in safetensors, the rest as JSON, restored by
load_checkpoint and CheckpointManager.resume, and checked before anything loads."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ckptio import Booster, CheckpointFormatError, CheckpointManager, StateMismatchError
from ckptio.training import load_checkpoint, save_checkpoint


class EMA:
    """An exponential moving average of a model's weights, as training scripts write it."""

    def __init__(self, model: nn.Module, decay: float = 0.9) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


class LoaderState:
    """A data loader's position: plain values and a generator's state (a 5 KB uint8 tensor)."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)
        self.position = {"epoch": 0, "yielded": 0, "buckets": (1, 2), "worker_offsets": [0, 0]}

    def state_dict(self) -> dict:
        return {**self.position, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.generator.set_state(state.pop("generator"))
        self.position = state


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    objects = {"scaler": torch.amp.GradScaler("cpu", init_scale=2.0**seed), "ema": EMA(model), "loader": LoaderState()}
    return booster, model, optimizer, objects


def train(model, optimizer, objects, steps: int = 3) -> None:
    scaler = objects["scaler"]
    for _ in range(steps):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        objects["ema"].update(model)
        torch.randperm(10, generator=objects["loader"].generator)  # the loader draws
    scaler.update(new_scale=1024.0)
    objects["loader"].position = {"epoch": 2, "yielded": 7, "buckets": (5, 6), "worker_offsets": [3, 4]}


def assert_same(objects, other) -> None:
    assert other["scaler"].state_dict() == objects["scaler"].state_dict()
    ema, ema2 = objects["ema"], other["ema"]
    assert (ema2.decay, ema2.num_updates) == (ema.decay, ema.num_updates)
    for k, v in ema.shadow.items():
        assert torch.equal(ema2.shadow[k], v), k
    assert other["loader"].position == objects["loader"].position
    assert torch.equal(other["loader"].generator.get_state(), objects["loader"].generator.get_state())


def test_round_trip_and_files(tmp_path):
    booster, model, optimizer, objects = setup()
    train(model, optimizer, objects)
    path = save_checkpoint(tmp_path, booster, model, optimizer, None, 1, 3, 4, stateful=objects)
    assert sorted(p.name for p in (path / "stateful").iterdir()) == [
        "ema.json", "ema.safetensors", "loader.json", "loader.safetensors", "scaler.json", "scaler.safetensors",
    ]  # fmt: skip
    document = json.loads((path / "stateful" / "ema.json").read_text())
    assert document["format"] == "ckptio-stateful" and document["state"]["num_updates"] == 3
    assert document["state"]["shadow"]["0.weight"]["__ref__"]["key"] == "shadow/0.weight"
    booster2, model2, optimizer2, objects2 = setup(seed=1)
    assert load_checkpoint(path, booster2, model2, optimizer2, None, stateful=objects2) == (1, 3, 12)
    assert_same(objects, objects2)


def test_manager_resume_restores_them(tmp_path):
    booster, model, optimizer, objects = setup()
    manager = CheckpointManager(tmp_path, booster)
    train(model, optimizer, objects)
    manager.save(model, optimizer, None, 0, 3, 4, stateful=objects, use_async=True)
    manager.wait()
    booster2, model2, optimizer2, objects2 = setup(seed=1)
    assert CheckpointManager(tmp_path, booster2).resume(model2, optimizer2, None, stateful=objects2) == (0, 3, 12)
    assert_same(objects, objects2)


def test_checked_before_anything_loads(tmp_path):
    booster, model, optimizer, objects = setup()
    train(model, optimizer, objects)
    path = save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 3, 4, stateful=objects)

    def untouched(fn, error, match):
        booster2, model2, optimizer2, objects2 = setup(seed=1)
        before = [v.clone() for v in model2.state_dict().values()]
        ema_before = {k: v.clone() for k, v in objects2["ema"].shadow.items()}
        with pytest.raises(error, match=match) as info:
            fn(booster2, model2, optimizer2, objects2)
        assert all(torch.equal(a, b) for a, b in zip(before, model2.state_dict().values()))
        assert all(torch.equal(objects2["ema"].shadow[k], v) for k, v in ema_before.items())
        assert objects2["scaler"].get_scale() == 2.0
        return str(info.value)

    # the job asks for an object the checkpoint lacks
    message = untouched(
        lambda b, m, o, objs: load_checkpoint(path, b, m, o, None, stateful={**objs, "teacher": EMA(m)}),
        StateMismatchError,
        "stateful\\['teacher'\\]",
    )
    assert "ema" in message and "scaler" in message  # what it holds
    # another object's state under a known name
    untouched(
        lambda b, m, o, objs: load_checkpoint(path, b, m, o, None, stateful={**objs, "scaler": objs["ema"]}),
        StateMismatchError,
        "lacks",
    )
    # an EMA of another model: a shape differs
    untouched(
        lambda b, m, o, objs: load_checkpoint(
            path,
            b,
            m,
            o,
            None,
            stateful={**objs, "ema": EMA(nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 2)))},
        ),
        StateMismatchError,
        "shadow/0.weight",
    )
    # a damaged file
    (path / "stateful" / "loader.json").write_text('{"format": "ckptio-stateful", "format_version": 1, "state": 3}')
    untouched(lambda b, m, o, objs: load_checkpoint(path, b, m, o, None, stateful=objs), CheckpointFormatError,
              "loader.json")  # fmt: skip


def test_bad_arguments_and_unsavable_state(tmp_path):
    booster, model, optimizer, objects = setup()
    with pytest.raises(ValueError, match="file names"):
        save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 1, 4, stateful={"a/b": objects["ema"]})
    with pytest.raises(TypeError, match="load_state_dict"):
        save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 1, 4, stateful={"x": object()})
    objects["loader"].position["callback"] = print
    with pytest.raises(CheckpointFormatError, match="callback"):
        save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 1, 4, stateful=objects)
    assert not any(tmp_path.iterdir())
