"""TorchFSDPPlugin (FSDP2): saves at 2 and 4 ranks load at 1, 2, 3 and 4 ranks, in a plain
process and in ``transformers``."""

from __future__ import annotations

import json

import pytest
import torch
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys, full_state, make_uneven

from ckptio import Booster
from ckptio.formats.naming import MANIFEST
from ckptio.plugins import TorchFSDPPlugin


def _fsdp(model):
    booster = Booster(plugin=TorchFSDPPlugin(shard_classes={"Block"}))
    model, *_ = booster.boost(model)
    return booster, model


def _save(path, shard: bool = True) -> None:
    booster, model = _fsdp(make_uneven(seed=0))
    booster.save_model(model, path, shard=shard, use_safetensors=True, size_per_shard=0.0002)


def _load(path) -> list[str]:
    booster, model = _fsdp(make_uneven(seed=5))
    from torch.distributed.tensor import DTensor

    assert isinstance(model.head.weight, DTensor)
    report = booster.load_model(model, path)
    assert report.ok, report.describe()
    idx = torch.arange(12).reshape(3, 4)
    with torch.no_grad():
        assert torch.equal(model(idx), make_uneven(seed=0)(idx))  # the live sharded params took the values
    return diff_keys(full_state(model), make_uneven(seed=0).state_dict())


def test_fsdp_model_resharding(tmp_path):
    ck = {2: tmp_path / "fsdp2", 4: tmp_path / "fsdp4", 3: tmp_path / "single.bin"}
    loads = {2: (1, 3, 4), 4: (2, 1), 3: (2,)}  # 3: one .bin file gathered on the master

    def scenario(ctx):
        out = {}
        for saved, targets in loads.items():
            ctx.phase(saved, f"save{saved}", lambda s=saved: _save(ck[s], shard=s != 3))
            for ws in targets:
                bad = ctx.phase(ws, f"load{saved}-{ws}", lambda s=saved: _load(ck[s]))
                if bad is not None:
                    out[f"{saved}->{ws}"] = bad
        return out

    results = run_ranks(scenario, 4, tmp_path)
    assert all(bad == [] for out in results for bad in out.values()), results
    assert set(results[0]) == {"2->1", "2->3", "2->4", "4->2", "4->1", "3->2"}
    assert ck[3].is_file()
    for saved in (2, 4):
        writers = json.loads((ck[saved] / MANIFEST).read_text())["written_by_rank"]
        assert len(set(writers.values())) == saved, writers
    # a plain process reads the FSDP2 folder
    plain = make_uneven(seed=9)
    Booster().load_model(plain, ck[4])
    assert diff_keys(plain.state_dict(), make_uneven(seed=0).state_dict()) == []


def _logits(model) -> torch.Tensor:
    idx = torch.arange(20).reshape(2, 10) % 128
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fsdp_hf_model_loads_in_plain_process_and_transformers(tmp_path, arch):
    from tests.helpers import tiny_gpt2, tiny_llama
    from transformers import AutoModelForCausalLM

    make = tiny_gpt2 if arch == "gpt2" else tiny_llama
    ck = tmp_path / arch

    def save():
        booster = Booster(plugin=TorchFSDPPlugin())  # each decoder layer (_no_split_modules) is an FSDP unit
        model, *_ = booster.boost(make(seed=0))
        if arch == "gpt2":
            assert model.lm_head.weight is model.transformer.wte.weight  # still tied after sharding
        booster.save_model(model, ck, shard=True, use_safetensors=True, size_per_shard=0.02)

    def load():
        booster = Booster(plugin=TorchFSDPPlugin())
        model, *_ = booster.boost(make(seed=4))
        booster.load_model(model, ck)
        return torch.equal(_logits(model), _logits(make(seed=0)))

    def scenario(ctx):
        ctx.phase(2, "save", save)
        return ctx.phase(3, "load3", load)

    assert run_ranks(scenario, 3, tmp_path) == [True, True, True]
    expected = _logits(make(seed=0))
    hf = AutoModelForCausalLM.from_pretrained(ck).eval()
    assert torch.equal(_logits(hf), expected)
    plain = make(seed=8)
    Booster().load_model(plain, ck)
    assert torch.equal(_logits(plain), expected)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert ("lm_head.weight" in index["weight_map"]) == (arch == "llama")  # tied weights are saved once
    assert (ck / "config.json").is_file()
