import pytest

from ckptio.formats import naming


def test_weights_and_index_names_follow_hugging_face_and_colossalai_prefix_rule():
    assert naming.weights_name(True) == "model.safetensors"
    assert naming.weights_name(False) == "pytorch_model.bin"
    assert naming.weights_name(False, "ema") == "pytorch_model.ema.bin"
    assert naming.index_name(False, "ema") == "pytorch_model.bin.index.ema.json"
    assert naming.index_name(True) == "model.safetensors.index.json"


def test_shard_names():
    assert naming.shard_name("model.safetensors", 0, 4) == "model-00001-of-00004.safetensors"
    assert naming.shard_name("pytorch_model.ema.bin", 1, 2) == "pytorch_model.ema-00002-of-00002.bin"


def test_index_detection_is_anchored():
    assert naming.is_index_file("model.safetensors.index.json")
    assert naming.is_index_file("pytorch_model.bin.index.ema.json")
    assert not naming.is_index_file("model.safetensors")
    assert not naming.is_index_file("notes.json")
    assert not naming.is_index_file("a/b.index.json")


def test_model_index_detection_recognises_model_indexes_only():
    for name in (
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
        "model.safetensors.index.ema.json",
        "pytorch_model.bin.index.ema.json",
    ):
        assert naming.is_model_index(name), name
    for name in (
        "optimizer.index.json",
        "optimizer.index.ema.json",
        "pytorch_optim.bin.index.json",
        "other.index.json",
        "model.safetensors.index.a.b.json",
        "model.safetensors",
    ):
        assert not naming.is_model_index(name), name
    assert naming.safetensors_twin("pytorch_model.bin.index.ema.json") == "model.safetensors.index.ema.json"
    assert naming.safetensors_twin("model.safetensors.index.json") == "model.safetensors.index.json"


def test_owned_pattern_separates_prefixes():
    plain, ema = naming.model_files_pattern(None), naming.model_files_pattern("ema")
    for name in [
        "model-00001-of-00002.safetensors",
        "pytorch_model.bin",
        "model.safetensors.index.json",
        "pytorch_model-00001.bin",
    ]:
        assert plain.match(name) and not ema.match(name), name
    for name in ["model.ema-00001-of-00002.safetensors", "pytorch_model.bin.index.ema.json"]:
        assert ema.match(name) and not plain.match(name), name
    assert not plain.match("config2.json")


@pytest.mark.parametrize("bad", ["a.b", "../x", "a/b", "x y"])
def test_prefix_must_be_a_plain_word(bad):
    with pytest.raises(ValueError, match="prefix"):
        naming.check_prefix(bad)
