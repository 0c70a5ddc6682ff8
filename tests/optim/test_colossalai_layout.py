"""ColossalAI's sharded optimizer layout (SPEC §3): hand-built fixtures load; our writer's files match it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ckptio import Booster, CheckpointError, UnsafeCheckpointError


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    optimizer = torch.optim.AdamW(
        [
            {"params": [model[0].weight, model[0].bias], "lr": 0.01, "weight_decay": 0.1},
            {"params": [model[2].weight, model[2].bias], "lr": 0.002, "betas": (0.8, 0.95)},
        ]
    )
    return model, optimizer


def expected_state() -> dict[int, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    shapes = [(5, 4), (5,), (2, 5), (2,)]
    return {
        i: {
            "step": torch.tensor(float(7 + i)),
            "exp_avg": torch.randn(shape, generator=gen),
            "exp_avg_sq": torch.rand(shape, generator=gen),
        }
        for i, shape in enumerate(shapes)
    }


def groups() -> list[dict]:
    common = {"eps": 1e-8, "amsgrad": False, "maximize": False, "foreach": None, "capturable": False}
    common |= {"differentiable": False, "fused": None, "decoupled_weight_decay": True}
    return [
        {"lr": 0.005, "betas": (0.9, 0.999), "weight_decay": 0.1, "initial_lr": 0.01, **common, "params": [0, 1]},
        {"lr": 0.001, "betas": (0.8, 0.95), "weight_decay": 0.01, "initial_lr": 0.002, **common, "params": [2, 3]},
    ]


def build_fixture(folder, *, prefix: str = "", total_size_mib: bool = True) -> None:
    """Files exactly as ColossalAI's GeneralCheckpointIO.save_sharded_optimizer writes them."""
    folder.mkdir()
    p = f".{prefix}" if prefix else ""
    state = expected_state()
    torch.save({0: state[0], 1: state[1], 2: state[2]}, folder / f"pytorch_optim{p}-00001.bin")
    torch.save({3: state[3]}, folder / f"pytorch_optim{p}-00002.bin")
    torch.save(groups(), folder / f"pytorch_optim_group{p}.bin")
    index = {
        "metadata": {"total_size": 0.0003 if total_size_mib else 312, "param_groups": f"pytorch_optim_group{p}.bin"},
        "weight_map": {
            "0": f"pytorch_optim{p}-00001.bin",
            "1": f"pytorch_optim{p}-00001.bin",
            "2": f"pytorch_optim{p}-00001.bin",
            "3": f"pytorch_optim{p}-00002.bin",
        },
    }
    (folder / f"pytorch_optim.bin.index{p}.json").write_text(json.dumps(index, indent=4))


@pytest.mark.parametrize("prefix", ["", "ema"])
def test_hand_built_colossalai_checkpoint_loads(tmp_path, prefix):
    build_fixture(tmp_path / "optim", prefix=prefix)
    model, optimizer = model_and_optimizer()
    booster = Booster()
    booster.boost(model, optimizer)
    booster.load_optimizer(optimizer, tmp_path / "optim")
    loaded = optimizer.state_dict()
    for pid, entries in expected_state().items():
        for name, value in entries.items():
            assert loaded["state"][pid][name].dtype == value.dtype
            assert torch.equal(loaded["state"][pid][name], value), (pid, name)
    for got, want in zip(loaded["param_groups"], groups()):
        assert got == want  # lr, initial_lr, betas and every setting from the file
    assert optimizer.param_groups[1]["lr"] == 0.001


def test_our_colossalai_writer_matches_the_layout(tmp_path):
    model, optimizer = model_and_optimizer()
    booster = Booster()
    booster.boost(model, optimizer)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    booster.checkpoint_io.optimizer_layout = "colossalai"
    booster.save_optimizer(optimizer, tmp_path / "optim", shard=True, size_per_shard=0.0001)
    folder = tmp_path / "optim"
    index = json.loads((folder / "pytorch_optim.bin.index.json").read_text())
    assert index["metadata"]["param_groups"] == "pytorch_optim_group.bin"
    assert set(index["weight_map"]) == {"0", "1", "2", "3"}
    assert set(index["weight_map"].values()) <= {f"pytorch_optim-0000{i}.bin" for i in range(1, 5)}
    saved_groups = torch.load(folder / "pytorch_optim_group.bin", weights_only=True)
    assert saved_groups == optimizer.state_dict()["param_groups"]
    shard = torch.load(folder / index["weight_map"]["0"], weights_only=True)
    assert list(shard) == [0] and torch.equal(shard[0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_shard_missing_an_id_is_reported(tmp_path):
    build_fixture(tmp_path / "optim")
    torch.save({}, tmp_path / "optim" / "pytorch_optim-00002.bin")
    model, optimizer = model_and_optimizer()
    with pytest.raises(CheckpointError, match="lacks them"):
        Booster().load_optimizer(optimizer, tmp_path / "optim")


def test_pickled_code_in_group_file_is_refused(tmp_path):
    build_fixture(tmp_path / "optim")
    torch.save([{"params": [0, 1], "evil": print}], tmp_path / "optim" / "pytorch_optim_group.bin")
    model, optimizer = model_and_optimizer()
    with pytest.raises(UnsafeCheckpointError):
        Booster().load_optimizer(optimizer, tmp_path / "optim")


def test_group_file_outside_folder_is_refused(tmp_path):
    build_fixture(tmp_path / "optim")
    index_path = tmp_path / "optim" / "pytorch_optim.bin.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["param_groups"] = "../elsewhere.bin"
    index_path.write_text(json.dumps(index))
    model, optimizer = model_and_optimizer()
    with pytest.raises(CheckpointError, match="outside"):
        Booster().load_optimizer(optimizer, tmp_path / "optim")
