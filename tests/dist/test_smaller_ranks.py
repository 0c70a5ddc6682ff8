"""Smaller checkpoints on FSDP2 ranks: LoRA adapters saved as peft's folder and resumed exactly,
trainable-only saves, and unchanged shards linked (by the fingerprints of their pieces)."""

from __future__ import annotations

import json
import os
import warnings

import peft  # noqa: F401 (imported before the ranks fork, so each worker has it)
import torch
import transformers  # noqa: F401
from tests.dist.harness import run_ranks
from tests.dist.models import full_state
from tests.helpers import tiny_llama

from ckptio import Booster, CheckpointManager
from ckptio.formats.naming import MANIFEST
from ckptio.plugins import TorchFSDPPlugin
from ckptio.training import load_checkpoint, save_checkpoint

BATCHES = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(4)]


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def _step(booster, model, optimizer, batch) -> float:
    loss = model(batch, labels=batch).loss
    optimizer.zero_grad()
    booster.backward(loss, optimizer)
    optimizer.step()
    return loss.item()


def _adapted(booster):
    warnings.simplefilter("ignore")  # peft and transformers deprecation notes
    model = booster.enable_lora(tiny_llama(seed=0), lora_config=_lora_config())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer, *_ = booster.boost(model, optimizer)
    return model, optimizer


def _trainable(model) -> dict[str, torch.Tensor]:
    state = full_state(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def test_lora_on_fsdp2_saves_peft_folder_and_a_trainable_only_checkpoint_that_resumes_exactly(tmp_path):
    adapter, run = tmp_path / "adapter", tmp_path / "run"

    def straight():
        booster = Booster(plugin=TorchFSDPPlugin())
        model, optimizer = _adapted(booster)
        losses = [_step(booster, model, optimizer, b) for b in BATCHES[:2]]
        booster.save_lora_as_pretrained(model, adapter)
        saved = _trainable(model)
        save_checkpoint(run, booster, model, optimizer, None, 0, 2, 2, only_trainable=True)
        losses += [_step(booster, model, optimizer, b) for b in BATCHES[2:]]
        return losses, saved, _trainable(model)

    def resumed():
        booster = Booster(plugin=TorchFSDPPlugin())
        model, optimizer = _adapted(booster)  # the base weights come from tiny_llama(seed=0) again
        load_checkpoint(run / "epoch-0_step-2", booster, model, optimizer, None)
        return [_step(booster, model, optimizer, b) for b in BATCHES[2:]], _trainable(model)

    def scenario(ctx):
        return ctx.phase(2, "straight", straight), ctx.phase(2, "resumed", resumed)

    (losses, saved, final), (resumed_losses, resumed_final) = run_ranks(scenario, 2, tmp_path)[0]
    assert resumed_losses == losses[2:]
    assert resumed_final.keys() == final.keys() and all(torch.equal(resumed_final[k], final[k]) for k in final)
    # the training checkpoint holds the adapters and names the frozen base it left out
    index = json.loads((run / "epoch-0_step-2" / "modeling" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(saved) and index["metadata"]["only_trainable"] is True
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in index["metadata"]["frozen_keys"]
    # peft loads the adapter folder the two ranks wrote, unchanged
    from peft import PeftModel

    warnings.simplefilter("ignore")
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), adapter)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors", MANIFEST]


def _half_frozen():
    model = tiny_llama(seed=0)
    for name, param in model.named_parameters():
        param.requires_grad_(not (name.startswith("model.embed_tokens") or ".layers.0." in name))
    return model


def test_fsdp2_checkpoints_link_unchanged_shards_and_trainable_only_loads_in_one_process(tmp_path):
    run, trainable = tmp_path / "run", tmp_path / "trainable"

    def train_and_save():
        booster = Booster(plugin=TorchFSDPPlugin())
        model = _half_frozen()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model, optimizer, *_ = booster.boost(model, optimizer)
        manager = CheckpointManager(run, booster, keep_last=2)
        for step, batch in enumerate(BATCHES[:3], start=1):
            _step(booster, model, optimizer, batch)
            manager.save(model, optimizer, None, 0, step, 2, size_per_shard=0.02)
        booster.save_model(model, trainable, shard=True, use_safetensors=True, only_trainable=True)
        return full_state(model)

    final = run_ranks(lambda ctx: ctx.phase(2, "save", train_and_save), 2, tmp_path)[0]
    kept = sorted(run.iterdir())
    assert [p.name for p in kept] == ["epoch-0_step-2", "epoch-0_step-3"]  # step 1 rotated away
    manifests = [json.loads((p / MANIFEST).read_text()) for p in kept]
    index = json.loads((kept[1] / "modeling" / "model.safetensors.index.json").read_text())
    frozen_files = {index["weight_map"][k] for k in index["weight_map"] if ".layers.0." in k or "embed_tokens" in k}
    trained_files = set(index["weight_map"].values()) - frozen_files
    assert frozen_files and trained_files and not frozen_files & trained_files  # frozen tensors share no file
    for name in frozen_files:  # the same inode in both kept checkpoints (and in the rotated one, now gone)
        a, b = (os.stat(p / "modeling" / name) for p in kept)
        assert (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev) and a.st_nlink == 2
    frozen_bytes = sum(manifests[1]["files"][f"modeling/{n}"]["size"] for n in frozen_files)
    assert manifests[1]["reused"]["bytes"] == frozen_bytes
    # each kept checkpoint is whole: verified checksums, loaded in one process
    plain = tiny_llama(seed=7)
    report = Booster().load_model(plain, kept[1], verify=True)
    assert report.ok and all(torch.equal(plain.state_dict()[k], v) for k, v in final.items())
    # trainable-only from 2 ranks into one process holding the base weights: strict, and the frozen ones named
    base = _half_frozen()
    report = Booster().load_model(base, trainable)
    assert report.ok and sorted(report.frozen_keys) == sorted(k for k in final if ".layers.0." in k or "embed" in k)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in final.items())
