"""Two DDP ranks: model and optimizer saved into one folder (either order) beside a user's
``config.json``; both load back exactly and the user's file survives."""

from __future__ import annotations

import torch
import torch.distributed as dist
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys, full_optimizer_state, full_state, make_optimizer, make_uneven, train

from ckptio import Booster
from ckptio.plugins import TorchDDPPlugin

USER_CONFIG = '{"written_by": "the user"}'


def _boosted(seed: int):
    model = make_uneven(seed)
    optimizer = make_optimizer(model)
    booster = Booster(plugin=TorchDDPPlugin())
    model, optimizer, *_ = booster.boost(model, optimizer)
    return booster, model, optimizer


def _save(folder, model_first: bool):
    booster, model, optimizer = _boosted(0)
    train(model, optimizer, 2, dist.get_rank())
    saves = [
        lambda: booster.save_model(model, folder, shard=True, use_safetensors=True, size_per_shard=0.0002),
        lambda: booster.save_optimizer(optimizer, folder, shard=True, size_per_shard=0.0003),
    ]
    for save in saves if model_first else saves[::-1]:
        save()
    return full_state(model.module), full_optimizer_state(optimizer, model.module)


def _load(folder):
    booster, model, optimizer = _boosted(5)
    assert booster.load_model(model, folder).ok
    booster.load_optimizer(optimizer, folder)
    return full_state(model.module), full_optimizer_state(optimizer, model.module)


def test_ddp_model_and_optimizer_share_a_folder_with_a_user_file(tmp_path):
    folders = {True: tmp_path / "model-first", False: tmp_path / "optimizer-first"}
    for folder in folders.values():
        folder.mkdir()
        (folder / "config.json").write_text(USER_CONFIG)

    def scenario(ctx):
        out = {}
        for model_first, folder in folders.items():
            saved = ctx.phase(2, f"save-{model_first}", lambda f=folder, m=model_first: _save(f, m))
            loaded = ctx.phase(2, f"load-{model_first}", lambda f=folder: _load(f))
            (model_s, (optim_s, groups_s)), (model_l, (optim_l, groups_l)) = saved, loaded
            out[model_first] = diff_keys(model_s, model_l) + diff_keys(optim_s, optim_l)
            assert groups_s == groups_l
        return out

    for out in run_ranks(scenario, 2, tmp_path):
        assert out == {True: [], False: []}
    for folder in folders.values():
        assert (folder / "config.json").read_text() == USER_CONFIG
