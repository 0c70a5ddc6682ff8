"""ckptio <-> transformers / ColossalAI, both ways."""

import json

import pytest
import torch
from tests.helpers import assert_same_state, randomize, tiny_gpt2, tiny_llama

from ckptio import Booster

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("use_safetensors", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_transformers_loads_our_sharded_folder_with_equal_logits(tmp_path, build, use_safetensors):
    model = randomize(build())
    Booster().save_model(model, tmp_path / "ckpt", shard=True, use_safetensors=use_safetensors, size_per_shard=0.05)
    assert (tmp_path / "ckpt" / "config.json").is_file()
    assert (tmp_path / "ckpt" / "generation_config.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded) is type(model)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bf16_model_config_records_its_dtype(tmp_path):
    model = randomize(tiny_llama(torch.bfloat16))
    Booster().save_model(model, tmp_path / "ckpt", shard=True, use_safetensors=True)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.dtype == torch.bfloat16
    assert_same_state(model, loaded)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_we_load_save_pretrained_output(tmp_path, build):
    model = randomize(build())
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    fresh = build(seed=9)
    assert Booster().load_model(fresh, tmp_path / "hf").ok
    assert_same_state(model, fresh)


def test_we_load_the_sharded_bin_layout_older_transformers_wrote(tmp_path):
    """pytorch_model-0000i-of-0000N.bin + pytorch_model.bin.index.json, tied weights listed twice."""
    model = randomize(tiny_gpt2())
    state = model.state_dict()
    keys = list(state)
    half = len(keys) // 2
    folder = tmp_path / "old"
    folder.mkdir()
    weight_map = {}
    for i, part in enumerate([keys[:half], keys[half:]]):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    fresh = tiny_gpt2(seed=4)
    assert Booster().load_model(fresh, folder).ok
    assert_same_state(model, fresh)


@pytest.mark.parametrize("prefix", [None, "ema"])
def test_we_load_colossalai_layout_without_of_n_and_float_mib_total(tmp_path, prefix):
    """ColossalAI writes pytorch_model-00001.bin (no -of-N) and total_size as float MiB."""
    model = randomize(tiny_llama())
    state = model.state_dict()
    keys = list(state)
    folder = tmp_path / "colossal"
    folder.mkdir()
    stem = "pytorch_model" + (f".{prefix}" if prefix else "")
    weight_map = {}
    for i, part in enumerate([keys[:3], keys[3:]]):
        name = f"{stem}-{i + 1:05d}.bin"
        torch.save({k: state[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = "pytorch_model.bin.index" + (f".{prefix}" if prefix else "") + ".json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0.123456}, "weight_map": weight_map}))
    fresh = tiny_llama(seed=4)
    assert Booster().load_model(fresh, folder).ok
    assert_same_state(model, fresh)
