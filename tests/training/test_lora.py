"""LoRA through peft with ColossalAI's calls: ``enable_lora`` before ``boost``,
``save_lora_as_pretrained`` writes the folder peft loads, peft's folders load back, and a training
checkpoint holding only the adapters resumes bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tests.helpers import tiny_llama

from ckptio import Booster, CheckpointNotFoundError, StateMismatchError
from ckptio.formats.naming import MANIFEST
from ckptio.training import load_checkpoint, save_checkpoint

peft = pytest.importorskip("peft", reason="peft is a dev dependency (scripts/constraints-dev.txt)")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' notes to peft

BATCHES = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(4)]


def _config(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw)


def _adapted(booster, **kw):
    model = booster.enable_lora(tiny_llama(seed=0), lora_config=_config(**kw))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer, *_ = booster.boost(model, optimizer)
    return model, optimizer


def _step(booster, model, optimizer, batch) -> float:
    loss = model(batch, labels=batch).loss
    optimizer.zero_grad()
    booster.backward(loss, optimizer)
    optimizer.step()
    return loss.item()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("use_safetensors", [True, False])
def test_our_adapter_folder_loads_in_peft_and_peft_folders_load_back(tmp_path, use_safetensors):
    booster = Booster()
    model, optimizer = _adapted(booster)
    _step(booster, model, optimizer, BATCHES[0])  # lora_B starts at zero: a step makes it count
    booster.save_lora_as_pretrained(model, tmp_path / "ours", use_safetensors=use_safetensors)
    weights = "adapter_model.safetensors" if use_safetensors else "adapter_model.bin"
    assert sorted(os.listdir(tmp_path / "ours")) == ["adapter_config.json", weights, MANIFEST]
    trained = model.state_dict()
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["inference_mode"] is True and config["r"] == 4
    assert model.peft_config["default"].inference_mode is False  # the live config is left as it was

    in_peft = peft.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "ours")
    assert _same(in_peft.state_dict(), trained)

    model.save_pretrained(tmp_path / "peft", safe_serialization=use_safetensors)  # peft's own writer
    again = Booster().enable_lora(tiny_llama(seed=0), pretrained_dir=str(tmp_path / "peft"))
    assert _same(again.state_dict(), trained)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }  # loaded trainable, as ColossalAI's enable_lora does


def test_enable_lora_and_save_lora_refuse_what_cannot_work(tmp_path):
    booster = Booster()
    model, _ = _adapted(booster)
    with pytest.raises(ValueError, match="enable_lora must be called before boost"):
        booster.enable_lora(model, lora_config=_config())
    with pytest.raises(ValueError, match="needs lora_config"):
        booster.enable_lora(tiny_llama())
    with pytest.raises(ValueError, match="not both"):
        booster.enable_lora(tiny_llama(), pretrained_dir=str(tmp_path), lora_config=_config())
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        booster.enable_lora(tiny_llama(), lora_config={"r": 4})
    with pytest.raises(CheckpointNotFoundError, match="adapter_config.json is missing") as info:
        booster.enable_lora(tiny_llama(), pretrained_dir=str(tmp_path))
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ValueError, match="has no LoRA adapters: call booster.enable_lora"):
        booster.save_lora_as_pretrained(tiny_llama(), tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    # an adapter of another shape: every key checked before anything loads, the file named
    booster.save_lora_as_pretrained(model, tmp_path / "r4")
    config = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "k_proj", "v_proj"]
    (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(StateMismatchError, match=r"k_proj\.lora_A") as info:
        booster.enable_lora(tiny_llama(), pretrained_dir=str(tmp_path / "r4"))
    assert "adapter_model.safetensors" in str(info.value)


def test_a_checkpoint_of_the_adapters_alone_resumes_bit_exact(tmp_path):
    booster = Booster()
    model, optimizer = _adapted(booster)
    losses = [_step(booster, model, optimizer, b) for b in BATCHES[:2]]
    path = save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 2, 2, only_trainable=True)
    losses += [_step(booster, model, optimizer, b) for b in BATCHES[2:]]

    index = json.loads((path / "modeling" / "model.safetensors.index.json").read_text())
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(index["weight_map"]) == adapters  # no byte of the frozen base
    assert len(index["metadata"]["frozen_keys"]) == len(model.state_dict()) - len(adapters)

    fresh = Booster()
    resumed, resumed_optimizer = _adapted(fresh)  # the base weights come from the base model again
    assert load_checkpoint(path, fresh, resumed, resumed_optimizer, None) == (0, 2, 4)
    assert [_step(fresh, resumed, resumed_optimizer, b) for b in BATCHES[2:]] == losses[2:]
    assert _same(resumed.state_dict(), model.state_dict())
    for ours, theirs in zip(resumed_optimizer.state_dict()["state"].values(), optimizer.state_dict()["state"].values()):
        assert _same(ours, theirs)  # step, exp_avg, exp_avg_sq of every adapter
