"""Exact model round trips through every layout ckptio writes."""

from pathlib import Path

import pytest
import torch
from tests.helpers import MLPWithBuffers, assert_same_state, randomize, tiny_gpt2, tiny_llama
from torch import nn

from ckptio import Booster

LAYOUTS = [
    pytest.param(False, False, id="single-bin"),
    pytest.param(False, True, id="single-safetensors"),
    pytest.param(True, False, id="sharded-bin"),
    pytest.param(True, True, id="sharded-safetensors"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def target(tmp_path: Path, shard: bool, use_safetensors: bool) -> Path:
    if shard:
        return tmp_path / "ckpt"
    return tmp_path / ("model.safetensors" if use_safetensors else "model.bin")


@pytest.mark.parametrize("shard,use_safetensors", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlp_with_buffers_round_trip(tmp_path, shard, use_safetensors, dtype):
    model = randomize(MLPWithBuffers(dtype))
    model.norm.num_batches_tracked.fill_(7)
    booster = Booster()
    path = target(tmp_path, shard, use_safetensors)
    booster.save_model(model, path, shard=shard, use_safetensors=use_safetensors, size_per_shard=0.0005)
    fresh = randomize(MLPWithBuffers(dtype), seed=2)
    report = booster.load_model(fresh, path)
    assert report.ok
    assert_same_state(model, fresh)
    if shard:
        shards = [p for p in path.iterdir() if "-of-" in p.name]
        assert len(shards) >= 4, "a 512-byte limit must give many shards"


@pytest.mark.parametrize("shard,use_safetensors", LAYOUTS)
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transformers_models_round_trip(tmp_path, shard, use_safetensors, build, dtype):
    model = randomize(build(dtype))
    booster = Booster()
    path = target(tmp_path, shard, use_safetensors)
    booster.save_model(model, path, shard=shard, use_safetensors=use_safetensors, size_per_shard=0.02)
    fresh = build(dtype, seed=5)
    booster.load_model(fresh, path)
    assert_same_state(model, fresh)


def test_tied_weights_are_saved_once_and_stay_tied(tmp_path):
    model = randomize(tiny_gpt2())
    assert model.lm_head.weight is model.transformer.wte.weight
    Booster().save_model(model, tmp_path / "ckpt", shard=True, use_safetensors=True)
    index = (tmp_path / "ckpt" / "model.safetensors.index.json").read_text()
    assert "transformer.wte.weight" in index and "lm_head.weight" not in index
    fresh = tiny_gpt2(seed=3)
    assert Booster().load_model(fresh, tmp_path / "ckpt").ok
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_wrapped_and_compiled_prefixes_never_reach_files(tmp_path):
    model = randomize(MLPWithBuffers())
    wrapped = torch.nn.DataParallel(model)
    Booster().save_model(wrapped, tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert all(not k.startswith("module.") for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)
    fresh = MLPWithBuffers()
    Booster().load_model(torch.nn.DataParallel(fresh), tmp_path / "m.safetensors")
    assert_same_state(model, fresh)


def test_file_written_from_a_wrapped_model_by_torch_save_loads(tmp_path):
    model = randomize(MLPWithBuffers())
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    fresh = MLPWithBuffers()
    Booster().load_model(fresh, tmp_path / "ddp.pt")
    assert_same_state(model, fresh)


def test_save_does_not_mutate_the_live_model_or_config(tmp_path):
    model = tiny_gpt2()
    before_config = model.config.to_dict()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    Booster().save_model(model, tmp_path / "ckpt", shard=True, use_safetensors=True)
    assert model.config.to_dict() == before_config
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())


def test_checkpoint_io_load_model_returns_the_model_as_colossalai_and_keeps_the_report(tmp_path):
    """ColossalAI's ``CheckpointIO.load_model`` returns the model (``model = io.load_model(model,
    path)``); its ``Booster.load_model`` returns None, so ours returns the report there."""
    from ckptio.checkpoint_io.general import GeneralCheckpointIO

    saved = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    Booster().save_model(saved, tmp_path / "w.safetensors")
    io = GeneralCheckpointIO()
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    loaded = io.load_model(model, tmp_path / "w.safetensors")
    assert loaded is model and io.last_load_report.ok
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.state_dict().items())
    bigger = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.Linear(2, 1))
    booster = Booster()
    report = booster.load_model(bigger, tmp_path / "w.safetensors", strict=False)
    assert report is booster.checkpoint_io.last_load_report
    assert sorted(report.missing_keys) == ["3.bias", "3.weight"] and not report.ok
