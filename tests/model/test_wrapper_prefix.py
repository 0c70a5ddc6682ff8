"""Wrapper prefixes (``module.``, ``_orig_mod.``) are decided once per checkpoint, never per key.

A model may really own a submodule called ``module`` (``AveragedModel``, wrapper classes), so
``module.linear.weight`` in a file can be the model's own ``module.linear.weight`` or a
DDP-saved ``linear.weight``: only the whole checkpoint tells which.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from tests.helpers import averaged_linear, randomize, two_linears
from torch import nn

from ckptio import Booster, StateMismatchError


def _assert_exact(expected: dict[str, torch.Tensor], model: nn.Module) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    wrong = [k for k, v in expected.items() if not torch.equal(got[k], v)]
    assert not wrong, f"tensors landed under the wrong names: {wrong}"


def _detached(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _wrapped_keys(model: nn.Module) -> dict[str, torch.Tensor]:
    """What ``torch.save(DataParallel(model).state_dict())`` writes (DDP writes the same keys)."""
    state = nn.DataParallel(model).state_dict()
    assert all(k.startswith("module.") for k in state)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _write_sharded_by_hand(folder, state: dict[str, torch.Tensor], groups: list[list[str]]) -> None:
    """A Hugging Face sharded folder: ``groups[i]`` are the keys of shard ``i``."""
    folder.mkdir()
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(folder / name))
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}}
    index["weight_map"] = weight_map
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


BUILDERS = [pytest.param(two_linears, id="linear-and-module.linear"), pytest.param(averaged_linear, id="AveragedModel")]


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_file_of_a_wrapped_model_loads_under_the_right_names(tmp_path, build, writer):
    source = build(seed=1)
    expected = _detached(source)
    state = _wrapped_keys(source)
    path = tmp_path / ("ddp.bin" if writer == "torch.save" else "ddp.safetensors")
    if writer == "torch.save":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    fresh = build(seed=2)
    report = Booster().load_model(fresh, path)
    assert report.ok, report.describe()
    _assert_exact(expected, fresh)


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("shard", [False, True], ids=["one-file", "sharded"])
def test_ckptio_save_of_a_wrapped_model_loads_under_the_right_names(tmp_path, build, shard):
    source = build(seed=1)
    expected = _detached(source)
    path = tmp_path / ("ckpt" if shard else "m.safetensors")
    Booster().save_model(nn.DataParallel(source), path, shard=shard, use_safetensors=True, size_per_shard=0.0001)
    fresh = build(seed=2)
    report = Booster().load_model(nn.DataParallel(fresh), path)
    assert report.ok, report.describe()
    _assert_exact(expected, fresh)


def test_prefix_is_decided_over_every_shard_of_the_index(tmp_path):
    # The first shard alone looks unprefixed (`module.linear.*` fits the model as it is);
    # the second shows that every key carries DDP's `module.`.
    source = two_linears(seed=1)
    expected = _detached(source)
    state = _wrapped_keys(source)
    first = ["module.linear.weight", "module.linear.bias"]
    _write_sharded_by_hand(tmp_path / "ckpt", state, [first, [k for k in state if k not in first]])
    fresh = two_linears(seed=2)
    report = Booster().load_model(fresh, tmp_path / "ckpt")
    assert report.ok, report.describe()
    _assert_exact(expected, fresh)


def test_twice_wrapped_keys_strip_only_what_fits(tmp_path):
    # DDP around a model that itself wraps: `module.module.*` -> exactly one level stripped.
    inner = nn.Module()
    inner.module = nn.Linear(4, 4)
    randomize(inner, seed=1)
    expected = _detached(inner)
    torch.save({f"module.{k}": v for k, v in inner.state_dict().items()}, tmp_path / "ddp.bin")
    fresh = nn.Module()
    fresh.module = randomize(nn.Linear(4, 4), seed=2)
    assert Booster().load_model(fresh, tmp_path / "ddp.bin").ok
    _assert_exact(expected, fresh)


def test_a_tie_keeps_the_names_as_they_are(tmp_path):
    # `module.weight` fits the model unchanged and also after stripping: no stripping wins.
    model = nn.Module()
    model.weight = nn.Parameter(torch.zeros(3))
    model.module = nn.Module()
    model.module.weight = nn.Parameter(torch.zeros(3))
    torch.save({"module.weight": torch.arange(3.0)}, tmp_path / "part.bin")
    report = Booster().load_model(model, tmp_path / "part.bin", strict=False)
    assert report.missing_keys == ["weight"]
    assert torch.equal(model.module.weight.detach(), torch.arange(3.0))
    assert torch.equal(model.weight.detach(), torch.zeros(3))


def test_keys_that_do_not_all_carry_the_prefix_are_not_stripped(tmp_path):
    # Only some keys start with `module.`: that is not a wrapper, so nothing is stripped and
    # the strict load reports the mismatch instead of loading `module.linear` into `linear`.
    source = two_linears(seed=1)
    state = {"module.linear.weight": source.linear.weight.detach(), "bias": source.linear.bias.detach()}
    torch.save(state, tmp_path / "mixed.bin")
    with pytest.raises(StateMismatchError) as info:
        Booster().load_model(two_linears(seed=2), tmp_path / "mixed.bin")
    assert "bias" in str(info.value) and "mixed.bin" in str(info.value)
