"""The training checkpoint folder: layout, atomicity, bad input, ColossalChat interop, sampler and RNG."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from ckptio import (
    Booster,
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    DistCoordinator,
    StateMismatchError,
)
from ckptio.training import (
    StatefulDistributedSampler,
    capture_rng_state,
    load_checkpoint,
    load_json,
    restore_rng_state,
    save_checkpoint,
    save_json,
)


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)
    booster = Booster()
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, None, None, scheduler)
    return booster, model, optimizer, scheduler


def step(model, optimizer, scheduler, n: int = 3):
    for _ in range(n):
        optimizer.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        scheduler.step()


def test_layout_and_round_trip(tmp_path):
    booster, model, optimizer, scheduler = setup()
    step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, booster, model, optimizer, scheduler, 2, 5, 16, DistCoordinator())
    assert path == tmp_path / "epoch-2_step-5"
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    assert files == [
        "ckptio_manifest.json",
        "lr_scheduler",
        "modeling/model-00001-of-00001.safetensors",
        "modeling/model.safetensors.index.json",
        "optimizer/optimizer-00001-of-00001.safetensors",
        "optimizer/optimizer.index.json",
        "rng_state/rank_00000.json",
        "running_states.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-2_step-5"]  # no staging left
    running = load_json(path / "running_states.json")
    assert (running["epoch"], running["step"], running["sample_start_index"]) == (2, 5, 80)
    manifest = json.loads((path / "ckptio_manifest.json").read_text())
    assert set(manifest["files"]) == set(files) - {"ckptio_manifest.json"}

    booster2, model2, optimizer2, scheduler2 = setup(seed=1)
    assert load_checkpoint(path, booster2, model2, optimizer2, scheduler2) == (2, 5, 80)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert optimizer2.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert scheduler2.state_dict() == scheduler.state_dict()


def test_missing_running_states_raises_before_touching_the_model(tmp_path):
    booster, model, optimizer, scheduler = setup()
    path = save_checkpoint(tmp_path, booster, model, optimizer, scheduler, 0, 1, 4, DistCoordinator())
    (path / "running_states.json").unlink()
    booster2, model2, optimizer2, scheduler2 = setup(seed=3)
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(CheckpointNotFoundError, match="running_states.json"):
        load_checkpoint(path, booster2, model2, optimizer2, scheduler2)
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())


def test_verify_detects_corruption(tmp_path):
    booster, model, optimizer, scheduler = setup()
    step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, booster, model, optimizer, scheduler, 0, 3, 4)
    shard = path / "optimizer" / "optimizer-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="checksum"):
        load_checkpoint(path, *setup(seed=2), verify=True)


def test_resave_replaces_the_folder_whole(tmp_path):
    booster, model, optimizer, scheduler = setup()
    save_checkpoint(tmp_path, booster, model, optimizer, scheduler, 0, 1, 4)
    (tmp_path / "epoch-0_step-1" / "stray.txt").write_text("old")
    step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, booster, model, optimizer, scheduler, 0, 1, 4)
    assert not (path / "stray.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0_step-1"]


def test_colossalchat_written_checkpoint_loads(tmp_path):
    """What ColossalChat's save_checkpoint writes: .bin model shards, ColossalAI optimizer
    layout, a torch.save scheduler file, running_states.json; no RNG files, no manifest."""
    booster, model, optimizer, scheduler = setup()
    step(model, optimizer, scheduler)
    folder = tmp_path / "epoch-1_step-7"
    booster.save_model(model, folder / "modeling", shard=True)
    booster.checkpoint_io.optimizer_layout = "colossalai"
    booster.save_optimizer(optimizer, folder / "optimizer", shard=True)
    torch.save(scheduler.state_dict(), folder / "lr_scheduler")
    (folder / "running_states.json").write_text(json.dumps({"epoch": 1, "step": 7, "sample_start_index": 56}))
    for sub in ("modeling", "optimizer"):
        (folder / sub / "ckptio_manifest.json").unlink()
    assert (folder / "optimizer" / "pytorch_optim.bin.index.json").is_file()

    booster2, model2, optimizer2, scheduler2 = setup(seed=5)
    assert load_checkpoint(folder, booster2, model2, optimizer2, scheduler2) == (1, 7, 56)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert optimizer2.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert scheduler2.state_dict() == scheduler.state_dict()


def test_sampler_state_is_saved_and_restored(tmp_path):
    booster, model, optimizer, scheduler = setup()
    sampler = StatefulDistributedSampler(list(range(20)), shuffle=True, seed=3)
    sampler.set_epoch(4)
    save_checkpoint(tmp_path, booster, model, optimizer, scheduler, 4, 2, 3, sampler=sampler)
    other = StatefulDistributedSampler(list(range(20)), shuffle=True, seed=0)
    load_checkpoint(tmp_path / "epoch-4_step-2", *setup(seed=1), sampler=other)
    assert (other.epoch, other.seed, other.start_index) == (4, 3, 6)
    assert list(other) == list(sampler)[6:]


def test_save_json_load_json(tmp_path):
    save_json({"a": 1, "b": [1.5, "x"]}, tmp_path / "sub" / "s.json")
    assert load_json(tmp_path / "sub" / "s.json") == {"a": 1, "b": [1.5, "x"]}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["s.json"]


def test_sampler_shuffles_per_epoch_and_resumes_mid_epoch():
    data = list(range(30))
    sampler = StatefulDistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=7)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert len(epoch0) == len(sampler) == 15 and epoch0 != epoch1
    other_rank = list(StatefulDistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=7))
    assert sorted(epoch0 + other_rank) == data
    sampler.set_start_index(4)
    assert len(sampler) == 11
    sampler.set_epoch(1)  # ColossalChat calls set_start_index before set_epoch: the index survives
    assert list(sampler) == epoch1[4:]
    assert sampler.start_index == 0 and list(sampler) == epoch1  # the next pass is a whole epoch
    state = sampler.state_dict()
    fresh = StatefulDistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=0)
    fresh.load_state_dict({**state, "start_index": 9})
    assert list(fresh) == epoch1[9:]
    with pytest.raises(ValueError):
        sampler.set_start_index(-1)


def test_rng_state_round_trip():
    state = json.loads(json.dumps(capture_rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_dist_coordinator_without_process_group():
    coordinator = DistCoordinator()
    assert (coordinator.rank, coordinator.world_size, coordinator.is_master()) == (0, 1, True)
    coordinator.block_all()  # a no-op in a world of one
    assert coordinator.on_master_only()(lambda: 5)() == 5
    with coordinator.priority_execution():
        pass


def test_missing_rng_file_is_an_error_with_manifest_and_a_warning_without(tmp_path):
    booster, model, optimizer, scheduler = setup()
    path = save_checkpoint(tmp_path, booster, model, optimizer, scheduler, 0, 1, 4)
    (path / "rng_state" / "rank_00000.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="rank_00000.json: listed in the manifest but missing"):
        load_checkpoint(path, booster, model, optimizer, scheduler)
    (path / "ckptio_manifest.json").unlink()  # no manifest to catch it: the resume still warns it is not exact
    with pytest.warns(UserWarning, match="rank_00000.json: RNG state file is missing"):
        assert load_checkpoint(path, booster, model, optimizer, scheduler) == (0, 1, 4)


def test_model_none_loads_the_rest_as_colossalchat_does(tmp_path):
    """ColossalChat's load_checkpoint skips a None model and loads optimizer, scheduler and position."""
    booster, model, optimizer, scheduler = setup()
    step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, booster, model, optimizer, scheduler, 1, 3, 4)
    booster2, model2, optimizer2, scheduler2 = setup(seed=1)
    weights = {k: v.clone() for k, v in model2.state_dict().items()}
    assert load_checkpoint(path, booster2, None, optimizer2, scheduler2) == (1, 3, 12)
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in weights.items())  # the model was left alone
    assert _same(optimizer2.state_dict(), optimizer.state_dict())
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert load_checkpoint(path, booster2, None, None, None) == (1, 3, 12)


def _live_state(model, optimizer, scheduler) -> dict:
    """Everything a load may change, copied: weights, optimizer and scheduler state, every global RNG."""
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scheduler": copy.deepcopy(scheduler.state_dict()),
        "rng": (random.getstate(), np.random.get_state(), torch.get_rng_state()),
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _flip_rng_format(rng_file) -> None:
    """Same size (the manifest's size check passes; only verify=True would see it): not an RNG state any more."""
    text = rng_file.read_text()
    assert '"ckptio-rng"' in text
    rng_file.write_text(text.replace('"ckptio-rng"', '"ckptio-rnX"'))


@pytest.mark.parametrize("problem", ["corrupt-rng-file", "scheduler-of-another-kind", "optimizer-does-not-fit"])
def test_a_load_refused_by_any_part_changes_nothing(tmp_path, problem):
    """Every part is checked before the first one is loaded: the model, optimizer, scheduler and
    RNG of the live job are exactly as they were when any part is refused."""
    booster, model, optimizer, scheduler = setup()
    step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, booster, model, optimizer, scheduler, 0, 3, 4)
    torch.manual_seed(11)
    live = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    params = list(live.parameters())
    live_optimizer = torch.optim.Adam(params, lr=1e-3)
    live_scheduler = torch.optim.lr_scheduler.StepLR(live_optimizer, 2, 0.5)
    if problem == "corrupt-rng-file":
        _flip_rng_format(path / "rng_state" / "rank_00000.json")
        expected, match = CheckpointFormatError, r"rank_00000\.json.*not a ckptio RNG state"
    elif problem == "scheduler-of-another-kind":  # the job now uses another scheduler
        live_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(live_optimizer, 10)
        expected, match = StateMismatchError, r"lr_scheduler.*CosineAnnealingLR"
    else:  # the job now has a param group per layer
        live_optimizer = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 1e-4}], lr=1e-3)
        live_scheduler = torch.optim.lr_scheduler.StepLR(live_optimizer, 2, 0.5)
        expected, match = StateMismatchError, r"optimizer\.index\.json.*the optimizer has 2"
    booster2 = Booster()
    live, live_optimizer, _, _, live_scheduler = booster2.boost(live, live_optimizer, None, None, live_scheduler)
    step(live, live_optimizer, live_scheduler, 2)
    before = _live_state(live, live_optimizer, live_scheduler)
    with pytest.raises(expected, match=match):
        load_checkpoint(path, booster2, live, live_optimizer, live_scheduler)
    after = _live_state(live, live_optimizer, live_scheduler)
    for part in before:
        assert _same(before[part], after[part]), f"the refused load changed the {part}"
