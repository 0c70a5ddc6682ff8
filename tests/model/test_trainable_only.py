"""``save_model(..., only_trainable=True)``: frozen parameters are left out and named, and a strict
load into a model that holds them (its base weights) checks exactly the keys the file holds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tests.helpers import MLPWithBuffers, randomize, tiny_llama
from torch import nn

from ckptio import Booster, StateMismatchError


def _half_frozen(seed: int = 0) -> nn.Module:
    model = tiny_llama(seed=seed)
    for name, param in model.named_parameters():
        param.requires_grad_(not (name.startswith("model.embed_tokens") or ".layers.0." in name))
    return model


def _fine_tuned() -> nn.Module:
    """The base of ``_half_frozen(0)`` with its trainable part changed."""
    model = _half_frozen()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen))
    return model


FROZEN = sorted(k for k in tiny_llama().state_dict() if k.startswith("model.embed_tokens") or ".layers.0." in k)


@pytest.mark.parametrize("shard", [True, False])
def test_only_trainable_writes_the_trained_part_and_a_strict_load_into_the_base_names_the_frozen_part(tmp_path, shard):
    tuned = _fine_tuned()
    path = tmp_path / ("ckpt" if shard else "model.safetensors")
    Booster().save_model(tuned, path, shard=shard, use_safetensors=True, size_per_shard=0.02, only_trainable=True)
    if shard:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        saved, metadata = set(index["weight_map"]), index["metadata"]
        assert metadata["only_trainable"] is True and sorted(metadata["frozen_keys"]) == FROZEN
    else:
        with safe_open(path, "pt") as f:
            saved = set(f.keys())
            assert sorted(json.loads(f.metadata()["ckptio_frozen_keys"])) == FROZEN
    assert saved == set(tuned.state_dict()) - set(FROZEN)

    base = _half_frozen()  # the base weights, as from_pretrained would give them
    report = Booster().load_model(base, path)  # strict=True
    assert report.ok and sorted(report.frozen_keys) == FROZEN and report.missing_keys == []
    assert "10 left out of this trainable-only checkpoint (frozen when saved" in report.describe()
    for key, value in tuned.state_dict().items():
        assert torch.equal(base.state_dict()[key], value), key


def test_strict_load_of_a_trainable_only_checkpoint_still_refuses_what_is_really_missing(tmp_path):
    tuned = _fine_tuned()
    Booster().save_model(tuned, tmp_path / "ckpt", shard=True, use_safetensors=True, only_trainable=True)
    bigger = _half_frozen()
    bigger.extra = nn.Linear(2, 2)  # trainable, in neither the file nor its list of frozen keys
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(StateMismatchError) as info:
        Booster().load_model(bigger, tmp_path / "ckpt")
    message = str(info.value)
    assert "2 missing from the checkpoint: extra.weight, extra.bias" in message and "ckpt" in message
    assert "10 left out of this trainable-only checkpoint" in message  # and what was left out on purpose
    assert all(torch.equal(bigger.state_dict()[k], v) for k, v in before.items())  # nothing loaded
    # a full checkpoint gives no such pass: a frozen key it lacks is missing
    full = tmp_path / "full.safetensors"
    Booster().save_model(nn.Linear(2, 2), full)
    report = Booster().load_model(bigger, full, strict=False, key_map=lambda k: f"extra.{k}")
    assert report.frozen_keys == [] and "model.embed_tokens.weight" in report.missing_keys


def test_buffers_are_always_saved_and_a_torch_file_is_refused_before_anything_is_written(tmp_path):
    model = randomize(MLPWithBuffers())
    for param in model.fc1.parameters():
        param.requires_grad_(False)
    Booster().save_model(model, tmp_path / "m.safetensors", only_trainable=True)
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        keys = list(f.keys())
    assert sorted(keys) == sorted(k for k in model.state_dict() if not k.startswith("fc1."))
    assert "norm.running_mean" in keys and "scale" in keys  # buffers change without gradients
    with pytest.raises(ValueError, match=r"m\.bin.*no room to record the frozen parameters.*\.safetensors"):
        Booster().save_model(model, tmp_path / "m.bin", only_trainable=True)
    assert not (tmp_path / "m.bin").exists()
