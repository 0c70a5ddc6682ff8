"""save_checkpoint / load_checkpoint on 2 ranks (DDP, gloo): one folder, one RNG file per rank."""

from __future__ import annotations

import torch
from tests.dist.harness import run_ranks
from torch import nn

from ckptio import Booster, DistCoordinator
from ckptio.plugins import TorchDDPPlugin
from ckptio.training import load_checkpoint, save_checkpoint


def _objects():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.9)
    booster = Booster(plugin=TorchDDPPlugin())
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, None, None, scheduler)
    return booster, model, optimizer, scheduler


def _scenario(ctx):
    def save():
        booster, model, optimizer, scheduler = _objects()
        rank = DistCoordinator().rank
        torch.manual_seed(100 + rank)  # each rank's dropout differs
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.ones(3, 4)).sum().backward()
            optimizer.step()
            scheduler.step()
        save_checkpoint(ctx.workdir / "ck", booster, model, optimizer, scheduler, 1, 2, 4, DistCoordinator())
        expected_next = torch.rand(2).tolist()  # what this rank draws right after the save
        state = {k: v.tolist() for k, v in model.module.state_dict().items()}  # plain data crosses the queue
        return expected_next, state

    saved = ctx.phase(2, "save", save)

    def load():
        booster, model, optimizer, scheduler = _objects()
        out = load_checkpoint(ctx.workdir / "ck" / "epoch-1_step-2", booster, model, optimizer, scheduler)
        return out, torch.rand(2).tolist(), {k: v.tolist() for k, v in model.module.state_dict().items()}

    loaded = ctx.phase(2, "load", load)
    return saved, loaded


def test_two_ranks_save_and_resume(tmp_path):
    results = run_ranks(_scenario, 2, tmp_path)
    (folder,) = tmp_path.glob("ranks-*/ck/epoch-1_step-2")
    names = sorted(p.name for p in (folder / "rng_state").iterdir())
    assert names == ["rank_00000.json", "rank_00001.json"]
    for (expected_next, state), (out, drawn, loaded_state) in results:
        assert out == (1, 2, 8)
        assert drawn == expected_next  # this rank's RNG came back (exact floats)
        assert loaded_state == state
    assert results[0][0][0] != results[1][0][0]  # the ranks' RNG states really differ
