"""``ckptio.load_state_dict`` / ``save_state_dict``: a checkpoint's tensors without a model, in any
layout we read, reading only the files and bytes asked for."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tests.helpers import MLPWithBuffers, randomize

import ckptio
from ckptio import Booster, StateMismatchError, load_state_dict, save_state_dict
from ckptio.engine import reader as reader_module
from ckptio.training import save_checkpoint


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_exported_at_top_level():
    assert ckptio.load_state_dict is load_state_dict and "load_state_dict" in ckptio.__all__
    assert ckptio.save_state_dict is save_state_dict and "save_state_dict" in ckptio.__all__


def test_keys_read_only_their_shards_and_bytes(tmp_path, monkeypatch):
    model = randomize(MLPWithBuffers(), 1)
    state = model.state_dict()
    folder = tmp_path / "ckpt"
    Booster().save_model(model, folder, shard=True, use_safetensors=True, size_per_shard=0.001)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = ["fc2.bias", "scale"]
    needed = {weight_map[k] for k in wanted}
    assert len(set(weight_map.values()) - needed) >= 2
    for name in set(weight_map.values()) - needed:
        (folder / name).unlink()  # a shard that is not asked for is never opened
    read = []
    real = reader_module._pread_exact
    monkeypatch.setattr(reader_module, "_pread_exact", lambda fd, v, off, p: (read.append(len(v)), real(fd, v, off, p)))
    out = load_state_dict(folder, wanted)
    assert _same(out, {k: state[k] for k in wanted})
    assert sum(read) == sum(state[k].nbytes for k in wanted), "only the tensors' own bytes are read"
    out["scale"].add_(1)  # new tensors: the next read is unchanged
    assert torch.equal(load_state_dict(folder, ["scale"])["scale"], state["scale"])


@pytest.mark.parametrize("layout", ["one.safetensors", "one.bin", "hf-folder", "training", "colossalai-prefix"])
def test_every_model_layout_reads(tmp_path, layout):
    model = randomize(MLPWithBuffers(), 1)
    state = model.state_dict()
    booster = Booster()
    if layout.startswith("one."):
        path = tmp_path / layout
        booster.save_model(model, path, use_safetensors=layout.endswith("safetensors"))
    elif layout == "hf-folder":
        path = tmp_path / "hf"
        path.mkdir()
        booster.save_model(model, path / "model.safetensors")
    elif layout == "training":
        path = save_checkpoint(tmp_path / "run", booster, model, None, None, 0, 3, 2)
    else:  # two prefixed saves share a folder: the index file says which
        booster.save_model(model, tmp_path / "shared", shard=True, prefix="ema", size_per_shard=0.001)
        booster.save_model(randomize(MLPWithBuffers(), 2), tmp_path / "shared", shard=True, size_per_shard=0.001)
        path = tmp_path / "shared" / "pytorch_model.bin.index.ema.json"
    assert _same(load_state_dict(path), state)
    assert _same(load_state_dict(path, ["scale", "fc1.weight"]), {k: state[k] for k in ("scale", "fc1.weight")})


def test_torch_file_tensors_share_no_memory(tmp_path):
    tied = torch.randn(3, 3)
    torch.save({"a": tied, "b": tied, "c": torch.arange(3)}, tmp_path / "w.bin")
    out = load_state_dict(tmp_path / "w.bin", ["b", "a"])
    assert list(out) == ["b", "a"] and torch.equal(out["a"], tied)
    out["a"].zero_()
    assert torch.equal(out["b"], tied), "each key is its own tensor"


@pytest.mark.parametrize("sharded", [False, True])
def test_a_missing_key_raises_naming_it(tmp_path, sharded):
    model = randomize(MLPWithBuffers(), 1)
    path = tmp_path / ("ckpt" if sharded else "w.safetensors")
    Booster().save_model(model, path, shard=sharded, use_safetensors=True, size_per_shard=0.001)
    with pytest.raises(StateMismatchError, match=r"1 keys not in this checkpoint: \['fc1.weigth'\]") as info:
        load_state_dict(path, ["fc1.weight", "fc1.weigth"])
    assert str(path) in str(info.value) and "'fc1.weight'?" in str(info.value)
    with pytest.raises(TypeError, match="not the string"):
        load_state_dict(path, "fc1.weight")


def test_url_downloads_only_the_files_asked_for():
    import fsspec

    state = {f"t{i}": torch.full((64,), float(i)) for i in range(6)}
    url = f"memory://ckptio-sd-{os.getpid()}/ck"
    save_state_dict(state, url, shard=True, size_per_shard=300 / 2**20)
    fs = fsspec.filesystem("memory")
    opened = []
    real_open = fs.open

    def spy(path, *args, **kwargs):
        opened.append(str(path).rsplit("/", 1)[-1])
        return real_open(path, *args, **kwargs)

    try:
        index = json.loads(fs.cat(next(p for p in fs.find(url) if p.endswith("index.json"))))
        shard = index["weight_map"]["t4"]
        fs.open = spy
        assert _same(load_state_dict(url, ["t4"]), {"t4": state["t4"]})
        assert [n for n in opened if n.endswith(".safetensors")] == [shard]
        fs.open = real_open
        assert _same(load_state_dict(url), state)
    finally:
        fs.open = real_open
        fs.rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def test_save_state_dict_checks_its_input(tmp_path):
    with pytest.raises(TypeError, match="'w': int"):
        save_state_dict({"w": 3}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="prefix"):
        save_state_dict({"w": torch.zeros(1)}, tmp_path / "d", shard=True, prefix="a.b")
    with pytest.raises(ValueError, match="size_per_shard"):
        save_state_dict({"w": torch.zeros(1)}, tmp_path / "d", shard=True, size_per_shard=0)
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "d").exists()
