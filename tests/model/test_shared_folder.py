"""A model and its optimizer saved into one folder, and user files beside a checkpoint.

``transformers`` loads such a folder (it looks for its own index names only), so must we:
model index detection recognises model indexes only. And a save replaces only the files it
writes (plus stale files of its own kind), never a user's ``config.json``.
"""

from __future__ import annotations

import json

import pytest
import torch
from tests.helpers import MLPWithBuffers, assert_same_state, randomize, tiny_gpt2

from ckptio import Booster
from ckptio.formats import naming


def _trained(build=MLPWithBuffers, seed: int = 1):
    model = randomize(build(), seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return booster, model, optimizer


def _assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for pid, entries in sa["state"].items():
        for name, value in entries.items():
            assert torch.equal(value, sb["state"][pid][name]), (pid, name)


@pytest.mark.parametrize("model_first", [True, False], ids=["model-first", "optimizer-first"])
@pytest.mark.parametrize("layout", ["ckptio", "colossalai"])
@pytest.mark.parametrize("use_safetensors", [True, False], ids=["safetensors", "bin"])
def test_model_and_optimizer_in_one_folder_both_load(tmp_path, model_first, layout, use_safetensors):
    booster, model, optimizer = _trained()
    booster.checkpoint_io.optimizer_layout = layout
    folder = tmp_path / "ckpt"
    saves = [
        lambda: booster.save_model(model, folder, shard=True, use_safetensors=use_safetensors, size_per_shard=0.001),
        lambda: booster.save_optimizer(optimizer, folder, shard=True, size_per_shard=0.001),
    ]
    for save in saves if model_first else saves[::-1]:
        save()
    names = {p.name for p in folder.iterdir()}
    assert naming.index_name(use_safetensors) in names
    assert ("optimizer.index.json" if layout == "ckptio" else "pytorch_optim.bin.index.json") in names

    fresh = randomize(MLPWithBuffers(), seed=2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    booster.boost(fresh, fresh_opt)
    assert booster.load_model(fresh, folder).ok
    assert_same_state(model, fresh)
    booster.load_optimizer(fresh_opt, folder)
    _assert_same_optimizer(optimizer, fresh_opt)


def test_transformers_model_and_optimizer_in_one_folder(tmp_path):
    from transformers import GPT2LMHeadModel

    booster, model, optimizer = _trained(tiny_gpt2)
    folder = tmp_path / "ckpt"
    booster.save_optimizer(optimizer, folder, shard=True)
    booster.save_model(model, folder, shard=True, use_safetensors=True)
    fresh = tiny_gpt2(seed=9)
    assert booster.load_model(fresh, folder).ok
    assert_same_state(model, fresh)
    theirs = GPT2LMHeadModel.from_pretrained(folder)
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("shard", [True, False], ids=["sharded", "one-file-inside"])
def test_model_save_keeps_the_users_config_json(tmp_path, shard):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "generation_config.json").write_text('{"also": "mine"}')
    model = randomize(MLPWithBuffers())
    target = folder if shard else folder / "model.safetensors"
    Booster().save_model(model, target, shard=shard)
    assert json.loads((folder / "config.json").read_text()) == {"mine": True}
    assert json.loads((folder / "generation_config.json").read_text()) == {"also": "mine"}
    fresh = MLPWithBuffers()
    Booster().load_model(fresh, target)
    assert_same_state(model, fresh)


def test_transformers_model_save_replaces_the_config_it_writes(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"stale": true}')
    model = tiny_gpt2()
    Booster().save_model(model, folder, shard=True, use_safetensors=True)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gpt2"
