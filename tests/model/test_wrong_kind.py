"""A load given a file or folder of another kind says what it got, naming the file, instead of
failing in a parser that was never meant for those bytes ("a safetensors header of 7.9e18
bytes", "an unsafe pickle")."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ckptio import Booster
from ckptio.errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    model = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    booster.save_lr_scheduler(torch.optim.lr_scheduler.StepLR(optimizer, 2), root / "lr_scheduler")  # torch.save
    legacy = {"format": "ckptio-lr-scheduler", "format_version": 1, "state": {"last_epoch": 0, "step_size": 2}}
    (root / "lr_scheduler.json").write_text(json.dumps(legacy))  # what ckptio wrote before torch.save
    torch.save(torch.optim.lr_scheduler.StepLR(optimizer, 2).state_dict(), root / "sched.pt")
    booster.save_model(model, root / "w.safetensors")
    booster.save_model(model, root / "w.bin")
    booster.save_optimizer(optimizer, root / "optim.bin")  # torch.save of the state_dict
    booster.save_model(model, root / "model_dir", shard=True)
    booster.save_optimizer(optimizer, root / "optim_dir", shard=True)
    (root / "notes.txt").write_text("learning rate 1e-3, batch 32\n")
    (root / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 4}))
    return root, model, optimizer


CASES = [
    # (loader, file, the words the error must hold)
    ("optimizer", "lr_scheduler", "this is an LR scheduler state_dict (torch.save), not an optimizer checkpoint"),
    ("optimizer", "lr_scheduler.json", "this is an LR scheduler file (ckptio JSON), not an optimizer checkpoint"),
    ("optimizer", "sched.pt", "this is an LR scheduler state_dict (torch.save), not an optimizer checkpoint"),
    ("optimizer", "w.safetensors", "this is a safetensors weights file, not an optimizer checkpoint"),
    ("optimizer", "w.bin", "this is model weights (torch.save), not an optimizer checkpoint"),
    ("optimizer", "notes.txt", "this is a text file, not an optimizer checkpoint"),
    ("optimizer", "config.json", "this is a Hugging Face model config (config.json), not an optimizer checkpoint"),
    ("optimizer", "model_dir", "no optimizer checkpoint in this folder"),
    ("model", "lr_scheduler", "this is an LR scheduler state_dict (torch.save), not model weights"),
    ("model", "lr_scheduler.json", "this is an LR scheduler file (ckptio JSON), not model weights"),
    ("model", "optim.bin", "this is an optimizer state_dict (torch.save), not model weights"),
    ("model", "notes.txt", "this is a text file, not model weights"),
    ("model", "config.json", "this is a Hugging Face model config (config.json), not model weights"),
    ("model", "optim_dir", "no model checkpoint in this folder"),
    ("lr_scheduler", "w.safetensors", "this is a safetensors weights file, not an LR scheduler file"),
    ("lr_scheduler", "w.bin", "this is model weights (torch.save), not an LR scheduler file"),
    ("lr_scheduler", "optim.bin", "this is an optimizer state_dict (torch.save), not an LR scheduler file"),
    ("lr_scheduler", "notes.txt", "this is a text file, not an LR scheduler file"),
]
HINTS = {
    "lr_scheduler": "load it with booster.load_lr_scheduler",
    "lr_scheduler.json": "load it with booster.load_lr_scheduler",
    "sched.pt": "load it with booster.load_lr_scheduler",
    "w.safetensors": "load it with booster.load_model",
    "w.bin": "load it with booster.load_model",
    "model_dir": "it holds a model checkpoint (load it with booster.load_model)",
    "optim_dir": "it holds an optimizer checkpoint (load it with booster.load_optimizer)",
}


@pytest.mark.parametrize("loader,name,words", CASES, ids=[f"{c[0]}<-{c[1]}" for c in CASES])
def test_a_load_given_another_kind_says_what_it_is(files, loader, name, words):
    root, model, optimizer = files
    target = {"model": model, "optimizer": optimizer}.get(loader)
    if target is None:
        target = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        getattr(Booster(), f"load_{loader}")(target, root / name)
    message = str(info.value)
    assert isinstance(info.value, CheckpointFormatError | CheckpointNotFoundError)
    assert str(root / name) in message and words in message, message
    assert "pickle" not in message and "header claims" not in message, message
    if name in HINTS and not (loader == "lr_scheduler" and name == "lr_scheduler"):
        assert HINTS[name] in message, message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_torch_file_named_safetensors_is_read_by_its_bytes(files, tmp_path):
    root, model, _ = files
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    target = nn.Linear(4, 3)
    Booster().load_model(target, tmp_path / "w.safetensors")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in target.state_dict().items())
