"""Optimizer state round trips through every layout: state tensors, dtypes and group settings exact."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from ckptio import Booster, StateMismatchError

OPTIMIZERS = {
    "sgd-momentum": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-3),
    "adamw-amsgrad": lambda groups: torch.optim.AdamW(groups, lr=1e-3, amsgrad=True, weight_decay=0.05),
}
LAYOUTS = ["single", "ckptio", "colossalai"]


def make_model(seed: int = 0, hidden: int = 12) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 8), nn.Tanh(), nn.Linear(8, 3))


def param_groups(model: nn.Module, n_groups: int) -> list[dict]:
    if n_groups == 1:
        return [{"params": list(model.parameters())}]
    layers = [model[0], model[2], model[4]]
    settings = [{"lr": 0.01, "weight_decay": 0.0}, {"lr": 0.02, "weight_decay": 0.1}, {"lr": 0.005}]
    return [{"params": list(layer.parameters()), **extra} for layer, extra in zip(layers, settings)]


def trained(kind: str, n_groups: int, steps: int = 3):
    model = make_model()
    optimizer = OPTIMIZERS[kind](param_groups(model, n_groups))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)  # adds initial_lr, changes lr
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 6, generator=gen)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
    return booster, model, optimizer


def fresh(kind: str, n_groups: int, booster: Booster, seed: int = 7):
    model = make_model(seed)
    optimizer = OPTIMIZERS[kind](param_groups(model, n_groups))
    booster.boost(model, optimizer)
    return model, optimizer


def save(booster: Booster, optimizer, tmp_path, layout: str, **kwargs):
    if layout == "single":
        path = tmp_path / "optim.bin"
        booster.save_optimizer(optimizer, path, **kwargs)
        return path
    booster.checkpoint_io.optimizer_layout = layout
    path = tmp_path / "optim"
    booster.save_optimizer(optimizer, path, shard=True, size_per_shard=0.0005, **kwargs)
    return path


def assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for pid, entries in sa["state"].items():
        assert entries.keys() == sb["state"][pid].keys()
        for name, value in entries.items():
            other = sb["state"][pid][name]
            assert type(value) is type(other), (pid, name)
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype, (pid, name)
                assert torch.equal(value, other), (pid, name)
            else:
                assert value == other


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_groups", [1, 3])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_round_trip(tmp_path, kind, n_groups, layout):
    booster, model, optimizer = trained(kind, n_groups)
    path = save(booster, optimizer, tmp_path, layout)
    model2, optimizer2 = fresh(kind, n_groups, booster)
    assert optimizer2.param_groups[0]["lr"] != optimizer.param_groups[0]["lr"]
    booster.load_optimizer(optimizer2, path)
    assert_same_optimizer_state(optimizer, optimizer2)
    for group in optimizer2.param_groups:
        assert "initial_lr" in group
    # The next step is identical too (same weights, same state -> same update).
    model2.load_state_dict(model.state_dict())
    for m, o in ((model, optimizer), (model2, optimizer2)):
        o.zero_grad()
        m(torch.ones(2, 6)).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_sharded_layout_is_named_and_pickle_free(tmp_path):
    booster, _, optimizer = trained("adamw-amsgrad", 3)
    path = save(booster, optimizer, tmp_path, "ckptio")
    names = sorted(p.name for p in path.iterdir())
    assert "optimizer.index.json" in names and "ckptio_manifest.json" in names
    assert all(n.endswith((".json", ".safetensors")) for n in names)
    index = json.loads((path / "optimizer.index.json").read_text())
    assert index["metadata"]["format"] == "ckptio-optimizer" and index["metadata"]["format_version"] == 1
    description = index["optimizer"]
    assert description["named"] is True
    assert description["param_groups"][1]["params"] == ["2.weight", "2.bias"]
    assert description["param_shapes"]["0.weight"] == [12, 6]
    assert description["state"]["0.weight"]["step"] == {"__tensor__": {"dtype": "float32", "shape": [], "data": 3.0}}
    assert index["weight_map"]["0.weight/exp_avg"].startswith("optimizer-0000")
    assert len(set(index["weight_map"].values())) > 1  # really sharded


def test_unsharded_file_is_plain_state_dict(tmp_path):
    booster, _, optimizer = trained("adam", 1)
    path = save(booster, optimizer, tmp_path, "single")
    loaded = torch.load(path, weights_only=True)
    expected = optimizer.state_dict()
    assert loaded["param_groups"] == expected["param_groups"]
    assert torch.equal(loaded["state"][0]["exp_avg"], expected["state"][0]["exp_avg"])
    # ... and a file plain torch wrote loads too.
    torch.save(expected, tmp_path / "plain.pt")
    _, optimizer2 = fresh("adam", 1, booster)
    booster.load_optimizer(optimizer2, tmp_path / "plain.pt")
    assert_same_optimizer_state(optimizer, optimizer2)


def test_load_by_name_when_parameter_order_changed(tmp_path):
    booster, _, optimizer = trained("adamw-amsgrad", 1)
    path = save(booster, optimizer, tmp_path, "ckptio")
    model2 = make_model(5)
    params = list(model2.parameters())[::-1]
    optimizer2 = torch.optim.AdamW(params, lr=1e-3, amsgrad=True)
    booster.boost(model2, optimizer2)
    booster.load_optimizer(optimizer2, path)
    names1 = [n for n, _ in make_model().named_parameters()]
    state1 = optimizer.state_dict()["state"]
    state2 = optimizer2.state_dict()["state"]
    for i, name in enumerate(names1):
        j = len(names1) - 1 - i  # position of the same parameter in the reversed optimizer
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert torch.equal(state1[i][key], state2[j][key]), (name, key)


def test_unnamed_optimizer_loads_by_position(tmp_path):
    """An optimizer nobody boosted has no names: ids are its names, loading goes by position."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 6)).sum().backward()
    optimizer.step()
    booster = Booster()
    path = tmp_path / "optim"
    booster.save_optimizer(optimizer, path, shard=True)
    index = json.loads((path / "optimizer.index.json").read_text())
    assert index["optimizer"]["named"] is False and "0/exp_avg" in index["weight_map"]
    optimizer2 = torch.optim.Adam(make_model(2).parameters())
    booster.load_optimizer(optimizer2, path)
    assert_same_optimizer_state(optimizer, optimizer2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_wrong_shape_names_the_parameter(tmp_path, layout):
    booster, _, optimizer = trained("adam", 1)
    path = save(booster, optimizer, tmp_path, layout)
    model2 = make_model(hidden=13)  # 0.weight, 0.bias and 2.weight change shape
    optimizer2 = torch.optim.Adam(model2.parameters())
    booster.boost(model2, optimizer2)
    before = optimizer2.state_dict()
    with pytest.raises(StateMismatchError, match=r"0\.weight"):
        booster.load_optimizer(optimizer2, path)
    assert optimizer2.state_dict() == before  # nothing changed


def test_missing_and_unexpected_parameters_are_named(tmp_path):
    booster, _, optimizer = trained("adam", 1)
    path = save(booster, optimizer, tmp_path, "ckptio")

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_model()
            self.head = nn.Linear(3, 2)

    other = Other()
    optimizer2 = torch.optim.Adam(other.parameters())
    booster.boost(other, optimizer2)
    with pytest.raises(StateMismatchError, match=r"'body\.0\.weight'.*not in the checkpoint"):
        booster.load_optimizer(optimizer2, path)

    smaller = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8))
    optimizer3 = torch.optim.Adam(smaller.parameters())
    booster.boost(smaller, optimizer3)
    with pytest.raises(StateMismatchError, match=r"'4\.weight'.*not in the optimizer"):
        booster.load_optimizer(optimizer3, path)


def test_group_count_mismatch(tmp_path):
    booster, _, optimizer = trained("sgd-momentum", 3)
    path = save(booster, optimizer, tmp_path, "colossalai")
    _, optimizer2 = fresh("sgd-momentum", 1, booster)
    with pytest.raises(StateMismatchError, match="3 param groups"):
        booster.load_optimizer(optimizer2, path)


def test_prefixed_saves_share_a_folder(tmp_path):
    booster, _, optimizer = trained("adam", 1)
    for layout in ("ckptio", "colossalai"):
        booster.checkpoint_io.optimizer_layout = layout
        booster.save_optimizer(optimizer, tmp_path / "o", shard=True, prefix=f"p{layout}")
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert "optimizer.index.pckptio.json" in names and "pytorch_optim.bin.index.pcolossalai.json" in names
    assert "pytorch_optim_group.pcolossalai.bin" in names and "pytorch_optim.pcolossalai-00001.bin" in names
    for index in ("optimizer.index.pckptio.json", "pytorch_optim.bin.index.pcolossalai.json"):
        _, optimizer2 = fresh("adam", 1, booster)
        booster.load_optimizer(optimizer2, tmp_path / "o" / index)
        assert_same_optimizer_state(optimizer, optimizer2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_async_save_snapshots_the_state_at_the_call(tmp_path, layout):
    booster, model, optimizer = trained("adamw-amsgrad", 3)
    expected = fresh("adamw-amsgrad", 3, booster)[1]
    expected.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # step tensors would be shared
    path = save(booster, optimizer, tmp_path, layout, use_async=True)
    model(torch.ones(2, 6)).sum().backward()  # training goes on while the save is written
    optimizer.step()
    booster.wait()
    _, optimizer2 = fresh("adamw-amsgrad", 3, booster)
    booster.load_optimizer(optimizer2, path)
    assert_same_optimizer_state(expected, optimizer2)


def test_switching_layout_replaces_the_other_layouts_files(tmp_path):
    booster, _, optimizer = trained("adam", 1)
    save(booster, optimizer, tmp_path, "ckptio")
    path = save(booster, optimizer, tmp_path, "colossalai")
    names = sorted(p.name for p in path.iterdir())
    assert not any(n.startswith("optimizer") for n in names) and "pytorch_optim.bin.index.json" in names
    _, optimizer2 = fresh("adam", 1, booster)
    booster.load_optimizer(optimizer2, path)  # one index left: no ambiguity
    assert_same_optimizer_state(optimizer, optimizer2)
