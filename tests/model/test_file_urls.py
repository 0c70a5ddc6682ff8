"""``file:///abs/path`` means ``/abs/path`` for every Booster save and load (not ``./file:/abs/path``)."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import MLPWithBuffers, assert_same_state, randomize

from ckptio import Booster


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from an empty working directory, to catch anything written under ``./file:``."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield tmp_path / "ckpts"
    assert list(cwd.iterdir()) == [], "a file:// URL was written under the working directory"


@pytest.mark.parametrize("shard", [False, True], ids=["one-file", "sharded"])
def test_booster_model_optimizer_scheduler_through_file_urls(elsewhere, shard):
    model = randomize(MLPWithBuffers())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)
    booster = Booster()
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, None, None, scheduler)
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    scheduler.step()
    suffix = "" if shard else ".bin"
    url = f"file://{elsewhere}"
    booster.save_model(model, f"{url}/model{suffix}", shard=shard)
    booster.save_optimizer(optimizer, f"{url}/optim{suffix}", shard=shard)
    booster.save_lr_scheduler(scheduler, f"{url}/scheduler")
    assert (elsewhere / f"model{suffix}").exists() and (elsewhere / f"optim{suffix}").exists()
    assert (elsewhere / "scheduler").is_file()

    fresh = MLPWithBuffers()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, 1, 0.5)
    booster.boost(fresh, fresh_opt, None, None, fresh_sched)
    assert booster.load_model(fresh, f"{url}/model{suffix}").ok
    booster.load_optimizer(fresh_opt, f"{url}/optim{suffix}")
    booster.load_lr_scheduler(fresh_sched, f"{url}/scheduler")
    assert_same_state(model, fresh)
    assert fresh_sched.state_dict() == scheduler.state_dict()
    saved, got = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(saved[i][k], got[i][k]) for i in saved for k in saved[i])


def test_async_model_save_through_a_file_url(elsewhere):
    model = randomize(MLPWithBuffers())
    booster = Booster()
    booster.save_model(model, f"file://{elsewhere}/m.safetensors", use_async=True)
    booster.wait()
    fresh = MLPWithBuffers()
    booster.load_model(fresh, elsewhere / "m.safetensors")
    assert_same_state(model, fresh)
