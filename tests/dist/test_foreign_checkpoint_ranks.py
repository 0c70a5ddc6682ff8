"""A transformers.Trainer checkpoint loaded on 2 DDP ranks: every rank gets the model and the
optimizer (positional ids), and rank r the RNG of the Trainer's process r."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tests.dist.harness import run_ranks
from tests.training.foreign_runs import tiny, trainer_objects, trainer_run

from ckptio import Booster, DistCoordinator
from ckptio.plugins import TorchDDPPlugin
from ckptio.training import load_checkpoint

pytestmark = pytest.mark.dist


def _per_process_rng_files(folder):
    """What Trainer writes on 2 processes instead of rng_state.pth (its _save_rng_state's dict),
    with each process's generators in another state; returns what each then draws from torch."""
    (folder / "rng_state.pth").unlink()
    draws = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        random.seed(100 + rank)
        np.random.seed(100 + rank)
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        torch.save(state, folder / f"rng_state_{rank}.pth")
        draws.append(torch.rand(2).tolist())
    return draws


def _scenario(folder):
    def load():
        model = tiny()
        optimizer, scheduler = trainer_objects(model)
        booster = Booster(plugin=TorchDDPPlugin())
        model, optimizer, _, _, scheduler = booster.boost(model, optimizer, None, None, scheduler)
        position = load_checkpoint(folder, booster, model, optimizer, scheduler)
        state = {k: v.tolist() for k, v in model.module.state_dict().items()}
        moments = [optimizer.state[p]["exp_avg"].tolist() for p in model.module.parameters()]
        return DistCoordinator().rank, position, torch.rand(2).tolist(), state, moments

    return lambda ctx: ctx.phase(2, "load", load)


def test_trainer_checkpoint_on_two_ranks(tmp_path):
    folder = trainer_run(tmp_path / "out") / "checkpoint-6"
    draws = _per_process_rng_files(folder)
    saved = {k: v.tolist() for k, v in load_file(folder / "model.safetensors").items()}
    optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True)["state"]
    # positions follow Trainer's groups: fc1.weight, fc2.weight, then fc1.bias, norm.weight, norm.bias, fc2.bias
    order = [0, 2, 3, 4, 1, 5]
    moments = [optimizer_state[i]["exp_avg"].tolist() for i in order]
    for rank, (got_rank, position, drawn, state, got_moments) in enumerate(run_ranks(_scenario(folder), 2, tmp_path)):
        assert (got_rank, position) == (rank, (1, 2, 4))
        assert drawn == draws[rank]  # this rank's own file
        assert state == saved and got_moments == moments
