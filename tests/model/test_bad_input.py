"""Bad checkpoints raise CheckpointError naming the file, and never run code."""

import json
import os

import pytest
import torch
from tests.helpers import MLPWithBuffers, randomize

from ckptio import Booster, CheckpointError, StateMismatchError, UnsafeCheckpointError


@pytest.fixture
def sharded(tmp_path):
    model = randomize(MLPWithBuffers())
    Booster().save_model(model, tmp_path / "ckpt", shard=True, use_safetensors=True, size_per_shard=0.001)
    return tmp_path / "ckpt"


def shards(folder):
    return sorted(p for p in folder.iterdir() if "-of-" in p.name)


def test_missing_shard(sharded):
    victim = shards(sharded)[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match="missing") as info:
        Booster().load_model(MLPWithBuffers(), sharded)
    assert victim.name in str(info.value)


@pytest.mark.parametrize("keep_manifest", [True, False])
def test_truncated_shard(sharded, keep_manifest):
    if not keep_manifest:
        (sharded / "ckptio_manifest.json").unlink()
    victim = shards(sharded)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 5])
    with pytest.raises(CheckpointError) as info:
        Booster().load_model(MLPWithBuffers(), sharded)
    assert victim.name in str(info.value)


def test_truncated_bin_file(tmp_path):
    Booster().save_model(randomize(MLPWithBuffers()), tmp_path / "m.bin")
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "m.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.bin"):
        Booster().load_model(MLPWithBuffers(), tmp_path / "m.bin")


def test_malformed_index_json(sharded):
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(CheckpointError, match="not valid JSON") as info:
        Booster().load_model(MLPWithBuffers(), sharded)
    assert "model.safetensors.index.json" in str(info.value)


@pytest.mark.parametrize("evil", ["../outside.safetensors", "/etc/passwd", "a/../../x.safetensors"])
def test_index_entry_outside_the_folder(sharded, evil):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = evil
    index_path.write_text(json.dumps(index))
    with pytest.raises(UnsafeCheckpointError, match="outside") as info:
        Booster().load_model(MLPWithBuffers(), sharded)
    assert "model.safetensors.index.json" in str(info.value)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_bin_whose_pickle_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"fc1.weight": _RunsCode(str(marker))}, tmp_path / "evil.bin")
    with pytest.raises(UnsafeCheckpointError, match="evil.bin"):
        Booster().load_model(MLPWithBuffers(), tmp_path / "evil.bin")
    assert not marker.exists(), "the pickle's code must never run"


def test_strict_reports_every_problem_at_once_and_loads_nothing(tmp_path):
    source = randomize(MLPWithBuffers(), 1)
    state = source.state_dict()
    state["fc1.weight"] = torch.zeros(3, 3)
    state["fc2.bias"] = state["fc2.bias"].long()  # integer into float: a mismatch (float64 would be cast)
    del state["scale"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.bin")
    target = randomize(MLPWithBuffers(), 2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(StateMismatchError) as info:
        Booster().load_model(target, tmp_path / "bad.bin")
    message = str(info.value)
    for needle in ("fc1.weight", "fc2.bias", "scale", "extra.weight", "bad.bin", "float32[32, 16]", "float32[3, 3]"):
        assert needle in message, needle
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), "strict failure must not load"

    report = Booster().load_model(target, tmp_path / "bad.bin", strict=False)
    assert report.missing_keys == ["scale"]
    assert report.unexpected_keys == ["extra.weight"]
    assert sorted(m.key for m in report.mismatched) == ["fc1.weight", "fc2.bias"]
    assert torch.equal(target.fc2.weight, source.fc2.weight), "strict=False loads what fits"
    assert torch.equal(target.fc1.weight, before["fc1.weight"]), "mismatched tensors are left alone"


def test_load_into_model_after_good_round_trip_with_verify(sharded):
    fresh = MLPWithBuffers()
    assert Booster().load_model(fresh, sharded, verify=True).ok
    victim = shards(sharded)[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    Booster().load_model(MLPWithBuffers(), sharded)  # same size: only a checksum can tell
    with pytest.raises(CheckpointError, match="checksum") as info:
        Booster().load_model(MLPWithBuffers(), sharded, verify=True)
    assert victim.name in str(info.value)
