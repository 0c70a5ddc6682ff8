"""The folder LightningCheckpointIO writes, without Lightning: a checkpoint dict of the shape
Lightning hands its CheckpointIO comes back exactly (types, int keys, tensors), through an atomic
commit with a manifest; bad values and damaged folders are refused, naming the problem."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

from ckptio import Booster, CheckpointCorruptError, CheckpointFormatError
from ckptio.checkpoint_io.general import GeneralCheckpointIO
from ckptio.integrations.lightning_format import (
    LightningCheckpointIOBase,
    load_lightning_checkpoint,
    remove_checkpoint_at,
    save_lightning_checkpoint,
)
from ckptio.storage.manifest import read_manifest


def lightning_like() -> dict:
    """What Lightning 2.6 puts in a checkpoint (trimmed): weights, Adam's state keyed by parameter id,
    a scheduler, loop counters, a callback's 0-dim inf tensor, hyper-parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return {
        "epoch": 1,
        "global_step": 4,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": OrderedDict((f"net.{k}", v) for k, v in model.state_dict().items()),
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 2, "completed": 1}}, "state_dict": {}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"kth_value": torch.tensor(float("inf")), "dirpath": "c"}},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [{"step_size": 1, "gamma": 0.9, "base_lrs": [0.1], "last_epoch": 2, "_last_lr": [0.081]}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 0.1, "sizes": (4, 8), "flag": None},
        "odd": {0: torch.ones(2), "0": torch.zeros(2)},  # an int and a str key of the same spelling
    }


def assert_same(got, want, where="checkpoint"):
    assert type(got) is type(want) or (isinstance(want, dict) and isinstance(got, dict)), where
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def test_round_trip_exact_with_a_model_folder_and_a_manifest(tmp_path):
    checkpoint = lightning_like()
    path = tmp_path / "last.ckpt"
    save_lightning_checkpoint(checkpoint, path)
    assert sorted(os.listdir(path)) == [
        "ckptio_manifest.json", "lightning_checkpoint.json", "model-00001-of-00001.safetensors",
        "model.safetensors.index.json", "state-00001-of-00001.safetensors", "state.safetensors.index.json",
    ]  # fmt: skip
    assert set(read_manifest(path).files) == set(os.listdir(path)) - {"ckptio_manifest.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    loaded = load_lightning_checkpoint(path, verify=True)
    assert_same(loaded, checkpoint)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    Booster().load_model(model, path, key_map=lambda k: k.removeprefix("net."))  # the weights are a model folder
    assert_same(dict(model.state_dict()), {k[4:]: v for k, v in checkpoint["state_dict"].items()})


def test_async_save_then_replace_a_file_an_earlier_plugin_wrote(tmp_path):
    checkpoint = lightning_like()
    io = GeneralCheckpointIO()
    save_lightning_checkpoint(checkpoint, tmp_path / "a.ckpt", io=io, use_async=True)
    io.wait()
    assert_same(load_lightning_checkpoint(tmp_path / "a.ckpt"), checkpoint)
    torch.save({"epoch": 0}, tmp_path / "last.ckpt")  # Lightning's TorchCheckpointIO wrote a file here
    save_lightning_checkpoint(checkpoint, tmp_path / "last.ckpt", io=io, use_async=True)
    assert (tmp_path / "last.ckpt").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "last.ckpt"]
    assert_same(load_lightning_checkpoint(tmp_path / "last.ckpt"), checkpoint)


def test_a_value_without_json_form_is_refused_before_anything_is_written(tmp_path):
    checkpoint = lightning_like()
    checkpoint["hyper_parameters"]["loss"] = nn.MSELoss()
    with pytest.raises(CheckpointFormatError, match=r"checkpoint\.hyper_parameters\.loss of type MSELoss"):
        save_lightning_checkpoint(checkpoint, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_folder_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "last.ckpt"
    save_lightning_checkpoint(lightning_like(), path)
    shard = path / "state-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(CheckpointCorruptError, match="state-00001-of-00001.safetensors"):
        load_lightning_checkpoint(path)
    (path / "ckptio_manifest.json").unlink()
    with pytest.raises(CheckpointCorruptError, match="ckptio_manifest.json is missing"):
        load_lightning_checkpoint(path)


def test_the_plugin_body_loads_removes_and_places_tensors(tmp_path):
    io = LightningCheckpointIOBase(use_async=True)
    checkpoint = lightning_like()
    io.save_checkpoint(checkpoint, tmp_path / "epoch=0.ckpt")
    loaded = io.load_checkpoint(tmp_path / "epoch=0.ckpt", map_location="meta")  # waits for the save first
    assert loaded["state_dict"]["net.0.weight"].device.type == "meta"
    assert loaded["optimizer_states"][0]["state"][0]["exp_avg"].device.type == "meta"
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(checkpoint, tmp_path / "x.ckpt", storage_options={"a": 1})
    io.remove_checkpoint(tmp_path / "epoch=0.ckpt")
    io.teardown()
    assert list(tmp_path.iterdir()) == []
    remove_checkpoint_at(tmp_path / "never-saved.ckpt")  # nothing there: nothing to do
