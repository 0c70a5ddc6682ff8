"""Modules' extra state (``get_extra_state`` / ``set_extra_state``, TransformerEngine style) saves and loads
in every model layout: a dict of Python values as JSON where the format has room, a uint8 tensor of
varying length in the weights files, and ``transformers``, safetensors and plain torch still read the files."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch import nn

from ckptio import Booster, CheckpointError, StateMismatchError


class FP8Recipe(nn.Module):
    """Like TransformerEngine's modules with a dict extra state: plain Python values."""

    def __init__(self, with_linear: bool = True) -> None:
        super().__init__()
        if with_linear:
            self.lin = nn.Linear(4, 4)
        self.meta: dict = {"recipe": "delayed", "amax_history_len": 16, "margin": 0, "scale": 1.0}

    def get_extra_state(self):
        return dict(self.meta)

    def set_extra_state(self, state) -> None:
        self.meta = dict(state)


class FP8Blob(nn.Module):
    """Like TransformerEngine >= 1.x: the metadata serialized into a uint8 tensor, empty when unused."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.blob = b""

    def get_extra_state(self):
        return torch.tensor(list(self.blob), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self.blob = bytes(state.tolist())


def build(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(FP8Recipe(), nn.ReLU(), FP8Blob())


def trained() -> nn.Sequential:
    model = build(1)
    model[0].meta = {"recipe": "hybrid", "amax_history_len": 1024, "margin": 2, "scale": 0.5, "dims": (3, 4),
                     "amax": torch.tensor([1.5, 2.25]), "nested": {"a": [1, None, "x"]}}  # fmt: skip
    model[2].blob = b"scale_fwd=0.125;amax=[3.0, 7.5];" * 3
    return model


def assert_restored(loaded: nn.Sequential, saved: nn.Sequential) -> None:
    for key, value in saved.state_dict().items():
        if isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
            assert torch.equal(loaded.state_dict()[key], value), key
    meta, want = loaded[0].meta, saved[0].meta
    assert set(meta) == set(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert meta[key].dtype == value.dtype and torch.equal(meta[key], value)
        else:
            assert meta[key] == value and type(meta[key]) is type(value), key
    assert loaded[2].blob == saved[2].blob


LAYOUTS = {
    "one-safetensors": dict(name="m.safetensors", shard=False),
    "one-bin": dict(name="m.bin", shard=False),
    "sharded-safetensors": dict(name="ckpt", shard=True, use_safetensors=True),
    "sharded-bin": dict(name="ckpt", shard=True, use_safetensors=False),
    "sharded-async": dict(name="ckpt", shard=True, use_safetensors=True, use_async=True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_extra_state_round_trips(tmp_path, layout):
    options = dict(LAYOUTS[layout])
    path = tmp_path / options.pop("name")
    saved = trained()
    booster = Booster()
    booster.save_model(saved, path, size_per_shard=0.0001, **options)
    saved[0].meta["scale"] = 9.0  # changed after the call: an async save wrote the state of the call
    booster.wait()
    saved[0].meta["scale"] = 0.5
    fresh = build(2)
    assert booster.load_model(fresh, path).ok
    assert_restored(fresh, saved)


def test_sharded_index_and_one_file_metadata_hold_the_json(tmp_path):
    saved = trained()
    Booster().save_model(saved, tmp_path / "ckpt", shard=True, use_safetensors=True)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["metadata"]["extra_state"]) == {"0._extra_state"}
    assert "2._extra_state" in index["weight_map"]  # the tensor one is a tensor of the shards
    assert "0._extra_state" not in index["weight_map"]
    Booster().save_model(saved, tmp_path / "m.safetensors")
    with safetensors.safe_open(tmp_path / "m.safetensors", framework="pt") as fh:  # safetensors reads it
        metadata = fh.metadata()
        assert fh.get_tensor("2._extra_state").dtype == torch.uint8
    assert metadata["format"] == "pt"
    assert json.loads(metadata["ckptio_extra_state"])["0._extra_state"]["recipe"] == "hybrid"


def test_plain_torch_loads_the_bin_file(tmp_path):
    """torch.save(model.state_dict()) keeps extra state in the dict; ours is that file, read with weights_only."""
    saved = trained()
    Booster().save_model(saved, tmp_path / "m.bin")
    fresh = build(2)
    fresh.load_state_dict(torch.load(tmp_path / "m.bin", weights_only=True))
    assert_restored(fresh, saved)
    # and the other way: a file plain torch wrote loads in ckptio
    torch.save(saved.state_dict(), tmp_path / "torch.bin")
    fresh = build(3)
    assert Booster().load_model(fresh, tmp_path / "torch.bin").ok
    assert_restored(fresh, saved)


class Plain(nn.Module):
    """The same weights as FP8Recipe / FP8Blob, no extra state."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)


def test_missing_and_unexpected_extra_state_are_reported(tmp_path):
    torch.manual_seed(0)
    plain = nn.Sequential(Plain(), nn.ReLU(), Plain())
    Booster().save_model(plain, tmp_path / "plain.safetensors")
    fresh = build(2)
    with pytest.raises(StateMismatchError, match=r"0\._extra_state") as info:
        Booster().load_model(fresh, tmp_path / "plain.safetensors")
    assert "plain.safetensors" in str(info.value)
    report = Booster().load_model(fresh, tmp_path / "plain.safetensors", strict=False)
    assert sorted(k for k in report.missing_keys if k.endswith("_extra_state")) == ["0._extra_state", "2._extra_state"]
    assert torch.equal(fresh[0].lin.weight, plain[0].lin.weight)
    Booster().save_model(trained(), tmp_path / "full.safetensors")
    report = Booster().load_model(plain, tmp_path / "full.safetensors", strict=False)
    assert set(report.unexpected_keys) >= {"0._extra_state", "2._extra_state"}


def test_extra_state_without_json_form_is_refused_before_writing(tmp_path):
    model = trained()
    model[0].meta["callback"] = print
    for options in (dict(shard=True), dict(shard=False)):
        path = tmp_path / ("ckpt" if options["shard"] else "m.safetensors")
        with pytest.raises(CheckpointError, match=r"extra state '0\._extra_state'") as info:
            Booster().save_model(model, path, **options)
        assert str(path) in str(info.value)
        assert not path.exists()


def test_transformers_still_loads_a_folder_with_extra_state(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.helpers import randomize, tiny_gpt2

    model = randomize(tiny_gpt2())
    model.transformer.h[0].recipe = FP8Recipe(with_linear=False)  # no weights, only extra state
    model.transformer.h[0].recipe.meta["scale"] = 0.25
    Booster().save_model(model, tmp_path / "ckpt", shard=True, use_safetensors=True, size_per_shard=0.05)
    Booster().save_model(model, tmp_path / "one" / "model.safetensors")
    (tmp_path / "one" / "config.json").write_text(model.config.to_json_string())
    ids = torch.randint(0, 128, (2, 12))
    for folder in (tmp_path / "ckpt", tmp_path / "one"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert safetensors.torch.load_file(tmp_path / "one" / "model.safetensors").keys() == {
        k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)
    } - {"lm_head.weight"}  # tied to the embedding: saved once
    fresh = tiny_gpt2(seed=3)
    fresh.transformer.h[0].recipe = FP8Recipe(with_linear=False)
    assert Booster().load_model(fresh, tmp_path / "ckpt").ok
    assert fresh.transformer.h[0].recipe.meta["scale"] == 0.25


def test_convert_carries_extra_state(tmp_path):
    from ckptio.tools import convert_checkpoint

    saved = trained()
    Booster().save_model(saved, tmp_path / "ckpt", shard=True, use_safetensors=True)
    convert_checkpoint(tmp_path / "ckpt", tmp_path / "one.safetensors")
    convert_checkpoint(tmp_path / "one.safetensors", tmp_path / "one.bin")
    convert_checkpoint(tmp_path / "one.bin", tmp_path / "again", fmt="bin")
    fresh = build(2)
    assert Booster().load_model(fresh, tmp_path / "again").ok
    assert_restored(fresh, saved)
