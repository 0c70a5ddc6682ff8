"""Prefixes, format detection, replacing an earlier save in the same folder."""

import json

import pytest
import torch
from tests.helpers import MLPWithBuffers, assert_same_state, randomize

from ckptio import Booster, CheckpointError, CheckpointFormatError
from ckptio.engine import write as engine_write


def test_two_prefixed_saves_share_a_folder(tmp_path):
    main, ema = randomize(MLPWithBuffers(), 1), randomize(MLPWithBuffers(), 2)
    booster = Booster()
    booster.save_model(main, tmp_path / "ckpt", shard=True, size_per_shard=0.001)
    booster.save_model(ema, tmp_path / "ckpt", shard=True, prefix="ema", size_per_shard=0.001)
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert "pytorch_model.bin.index.json" in names and "pytorch_model.bin.index.ema.json" in names
    assert any(n.startswith("pytorch_model.ema-00001-of-") for n in names)
    with pytest.raises(CheckpointFormatError, match="several model indexes"):
        booster.load_model(MLPWithBuffers(), tmp_path / "ckpt")
    for source, index in ((main, "pytorch_model.bin.index.json"), (ema, "pytorch_model.bin.index.ema.json")):
        fresh = MLPWithBuffers()
        booster.load_model(fresh, tmp_path / "ckpt" / index)
        assert_same_state(source, fresh)


def test_resave_replaces_stale_shards_of_any_format(tmp_path):
    booster = Booster()
    model = randomize(MLPWithBuffers(), 1)
    booster.save_model(model, tmp_path / "ckpt", shard=True, size_per_shard=0.0005)
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    model2 = randomize(MLPWithBuffers(), 2)
    booster.save_model(model2, tmp_path / "ckpt", shard=True, use_safetensors=True, size_per_shard=1)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == [
        "ckptio_manifest.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
        "notes.txt",
    ]
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"
    fresh = MLPWithBuffers()
    booster.load_model(fresh, tmp_path / "ckpt")
    assert_same_state(model2, fresh)


def test_failed_resave_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    booster = Booster()
    model = randomize(MLPWithBuffers(), 1)
    booster.save_model(model, tmp_path / "ckpt", shard=True, use_safetensors=True, size_per_shard=0.0005)
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    real = engine_write.write_weights_file
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_write, "write_weights_file", failing)
    with pytest.raises(OSError):
        booster.save_model(
            randomize(MLPWithBuffers(), 2), tmp_path / "ckpt", shard=True, use_safetensors=True, size_per_shard=0.0005
        )
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "staging folder must be removed"
    fresh = MLPWithBuffers()
    booster.load_model(fresh, tmp_path / "ckpt", verify=True)
    assert_same_state(model, fresh)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_folder_with_a_single_weights_file_is_detected(tmp_path, name):
    model = randomize(MLPWithBuffers())
    (tmp_path / "f").mkdir()
    Booster().save_model(model, tmp_path / "f" / name)
    fresh = MLPWithBuffers()
    Booster().load_model(fresh, tmp_path / "f")
    assert_same_state(model, fresh)


def test_unknown_suffix_is_sniffed(tmp_path):
    model = randomize(MLPWithBuffers())
    Booster().save_model(model, tmp_path / "weights.ckpt", use_safetensors=True)
    fresh = MLPWithBuffers()
    Booster().load_model(fresh, tmp_path / "weights.ckpt")
    assert_same_state(model, fresh)


def test_index_total_size_is_bytes_and_lists_every_tensor(tmp_path):
    model = randomize(MLPWithBuffers())
    Booster().save_model(model, tmp_path / "ckpt", shard=True, use_safetensors=True, size_per_shard=0.001)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert set(index["weight_map"]) == set(state)


def test_save_rejects_bad_arguments(tmp_path):
    booster = Booster()
    with pytest.raises(ValueError, match="size_per_shard"):
        booster.save_model(MLPWithBuffers(), tmp_path / "x", shard=True, size_per_shard=0)
    with pytest.raises(ValueError, match="prefix"):
        booster.save_model(MLPWithBuffers(), tmp_path / "x", shard=True, prefix="../evil")
    with pytest.raises(CheckpointError, match="does not exist"):
        booster.load_model(MLPWithBuffers(), tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model checkpoint"):
        booster.load_model(MLPWithBuffers(), tmp_path / "empty")
    assert torch.__version__
