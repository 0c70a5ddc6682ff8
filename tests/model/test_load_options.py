"""The load options users expect from ``load_state_dict`` and ColossalAI, on one process: dtype
casts, models on the ``meta`` device, tied weights stored under their second name, ``key_map``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tests.helpers import MLPWithBuffers, randomize, tiny_gpt2
from torch import nn

from ckptio import Booster, CheckpointError, StateMismatchError
from ckptio.state_dict import load_into, save_state_dict


def _cast_state(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("where", ["one.safetensors", "one.bin", "sharded"])
def test_fp32_checkpoint_loads_into_bf16_model_and_back_with_casts_reported(tmp_path, where):
    booster = Booster()
    source = randomize(MLPWithBuffers(), 1)
    path = tmp_path / where
    booster.save_model(source, path, shard=where == "sharded", use_safetensors=True, size_per_shard=0.001)

    bf16 = randomize(MLPWithBuffers(torch.bfloat16), 2)
    report = booster.load_model(bf16, path)  # strict=True: a cast is a fit
    assert report.ok
    expected = _cast_state(source, torch.bfloat16)
    assert all(torch.equal(v, expected[k]) and v.dtype == expected[k].dtype for k, v in bf16.state_dict().items())
    floats = [k for k, v in source.state_dict().items() if v.is_floating_point()]
    assert sorted(c.key for c in report.cast) == sorted(floats)
    assert {(c.from_dtype, c.to_dtype) for c in report.cast} == {("float32", "bfloat16")}
    assert "fc1.weight: float32 -> bfloat16" in report.describe()
    assert "num_batches_tracked" not in {c.key for c in report.cast}  # int64 both sides: no cast

    # and back: a bf16 checkpoint into an fp32 model holds exactly the bf16 values
    booster.save_model(bf16, tmp_path / "bf16.safetensors")
    fp32 = randomize(MLPWithBuffers(), 3)
    report = booster.load_model(fp32, tmp_path / "bf16.safetensors")
    assert {(c.from_dtype, c.to_dtype) for c in report.cast} == {("bfloat16", "float32")}
    assert all(torch.equal(v, bf16.state_dict()[k].to(v.dtype)) for k, v in fp32.state_dict().items())


def test_allow_dtype_cast_false_refuses_casts(tmp_path):
    source = randomize(MLPWithBuffers(), 1)
    Booster().save_model(source, tmp_path / "w.safetensors")
    bf16 = randomize(MLPWithBuffers(torch.bfloat16), 2)
    before = {k: v.clone() for k, v in bf16.state_dict().items()}
    with pytest.raises(StateMismatchError, match="allow_dtype_cast=False") as info:
        Booster().load_model(bf16, tmp_path / "w.safetensors", allow_dtype_cast=False)
    assert "fc1.weight: model has bfloat16[32, 16], checkpoint has float32[32, 16]" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in bf16.state_dict().items())

    report = Booster().load_model(bf16, tmp_path / "w.safetensors", strict=False, allow_dtype_cast=False)
    assert "fc1.weight" in {m.key for m in report.mismatched} and report.cast == []
    assert torch.equal(bf16.fc1.weight, before["fc1.weight"])
    assert torch.equal(bf16.norm.num_batches_tracked, source.norm.num_batches_tracked)  # same dtype: loaded


def test_integer_and_float_never_cast_into_each_other(tmp_path):
    """int <-> float and narrowing ints would change values: mismatches; widening ints are cast."""
    model = randomize(MLPWithBuffers(), 1)
    state = model.state_dict()
    state["norm.num_batches_tracked"] = torch.tensor(7, dtype=torch.int32)  # widened into the int64 buffer
    state["scale"] = torch.tensor([1, 2, 3, 4])  # int64 into a float buffer
    save_file(state, tmp_path / "w.safetensors")
    target = randomize(MLPWithBuffers(), 2)
    report = Booster().load_model(target, tmp_path / "w.safetensors", strict=False)
    assert [str(m) for m in report.mismatched] == [
        "scale: model has float32[4], checkpoint has int64[4]: no cast from integer to floating-point"
    ]
    assert [str(c) for c in report.cast] == ["norm.num_batches_tracked: int32 -> int64"]
    assert int(target.norm.num_batches_tracked) == 7

    narrow = MLPWithBuffers()
    narrow.norm.num_batches_tracked = torch.tensor(0, dtype=torch.int16)
    report = Booster().load_model(narrow, tmp_path / "w.safetensors", strict=False)
    assert "int16 cannot hold every int32 value" in report.describe()


def test_optimizer_state_of_another_dtype_follows_torch(tmp_path):
    """torch's Optimizer.load_state_dict casts floating state to its parameter's dtype (not step)."""
    booster = Booster()
    model = randomize(MLPWithBuffers(), 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer, *_ = booster.boost(model, optimizer)
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    booster.save_optimizer(optimizer, tmp_path / "optim", shard=True)
    bf16 = MLPWithBuffers(torch.bfloat16)
    bf16_optimizer = torch.optim.AdamW(bf16.parameters(), lr=0.1)
    bf16, bf16_optimizer, *_ = Booster().boost(bf16, bf16_optimizer)
    Booster().load_optimizer(bf16_optimizer, tmp_path / "optim")
    for (name, p), p32 in zip(bf16.named_parameters(), model.parameters()):
        state, saved = bf16_optimizer.state[p], optimizer.state[p32]
        assert state["exp_avg"].dtype == torch.bfloat16, name
        assert torch.equal(state["exp_avg"], saved["exp_avg"].to(torch.bfloat16)), name
        assert torch.equal(state["step"], saved["step"]), name


# ----------------------------------------------------------------------------- meta device
def _meta(factory):
    with torch.device("meta"):
        return factory()


def test_meta_model_is_materialised_with_ties_optimizer_and_grads_kept(tmp_path):
    source = randomize(tiny_gpt2(), 1)
    Booster().save_model(source, tmp_path / "ckpt", shard=True, use_safetensors=True, size_per_shard=0.05)
    model = _meta(tiny_gpt2)
    wte = model.transformer.wte.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert Booster().load_model(model, tmp_path / "ckpt").ok
    state = model.state_dict()
    assert all(v.device.type == "cpu" for v in state.values())
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in state.items())
    assert model.transformer.wte.weight is wte is model.lm_head.weight, "the same Parameter object, still tied"
    assert optimizer.param_groups[0]["params"][0] is wte and wte.requires_grad and isinstance(wte, nn.Parameter)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    assert wte.grad is not None and wte.grad.device.type == "cpu"


def test_meta_tensors_the_checkpoint_lacks_stay_on_meta_and_are_reported(tmp_path):
    source = randomize(MLPWithBuffers(), 1)
    state = source.state_dict()
    del state["fc2.weight"]
    save_file(state, tmp_path / "w.safetensors")
    model = _meta(MLPWithBuffers)
    with pytest.raises(StateMismatchError, match="fc2.weight"):
        Booster().load_model(model, tmp_path / "w.safetensors")
    assert model.fc1.weight.device.type == "meta", "a refused load materialises nothing"
    report = Booster().load_model(model, tmp_path / "w.safetensors", strict=False)
    assert report.missing_keys == ["fc2.weight"]
    assert model.fc2.weight.device.type == "meta"
    assert torch.equal(model.fc1.weight, source.fc1.weight) and torch.equal(model.scale, source.scale)


def test_load_into_meta_tensors_of_a_dict(tmp_path):
    save_state_dict({"a": torch.arange(4.0)}, tmp_path / "w.safetensors")
    dest = {"a": torch.empty(4, device="meta", dtype=torch.float64)}
    meta = dest["a"]
    report = load_into(dest, tmp_path / "w.safetensors")
    assert dest["a"] is meta and torch.equal(meta, torch.arange(4.0, dtype=torch.float64))
    assert [str(c) for c in report.cast] == ["a: float32 -> float64"]


def test_meta_tensor_held_elsewhere_is_refused_before_loading(tmp_path):
    Booster().save_model(randomize(MLPWithBuffers(), 1), tmp_path / "w.safetensors")
    model = _meta(MLPWithBuffers)
    view = model.fc1.weight.view(-1)  # noqa: F841 (a second reference: cannot be swapped in place)
    with pytest.raises(CheckpointError, match="'fc1.weight' is on the meta device") as info:
        Booster().load_model(model, tmp_path / "w.safetensors")
    assert "to_empty" in str(info.value)
    assert model.fc2.weight.device.type == "meta"


@pytest.mark.parametrize("use_async", [False, True])
def test_saving_a_meta_model_raises_naming_the_tensors(tmp_path, use_async):
    booster = Booster()
    model = _meta(MLPWithBuffers)
    with pytest.raises(CheckpointError, match="meta device") as info:
        booster.save_model(model, tmp_path / "ckpt", shard=True, use_async=use_async)
        booster.wait()
    assert "fc1.weight" in str(info.value) and "scale" in str(info.value)
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(CheckpointError, match="meta device"):
        save_state_dict({"x": torch.empty(2, device="meta")}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- tied weights
def test_tied_weight_stored_under_its_second_name_loads(tmp_path):
    """GPT-2 files holding lm_head.weight but not transformer.wte.weight (safetensors.torch.save_model
    may keep either name) load into a tied model with a clean report, as in transformers."""
    source = randomize(tiny_gpt2(), 1)
    state = {k: v for k, v in source.state_dict().items() if k != "transformer.wte.weight"}
    assert "lm_head.weight" in state
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    for path in (tmp_path / "model.safetensors", tmp_path):
        model = randomize(tiny_gpt2(), 2)
        report = Booster().load_model(model, path)
        assert report.ok and report.missing_keys == [], report.describe()
        assert model.transformer.wte.weight is model.lm_head.weight
        assert torch.equal(model.transformer.wte.weight, source.lm_head.weight)

    # a tied pair where nothing is stored is still missing, under both names
    del state["lm_head.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "none.safetensors")
    report = Booster().load_model(tiny_gpt2(), tmp_path / "none.safetensors", strict=False)
    assert report.missing_keys == ["transformer.wte.weight", "lm_head.weight"]


# ----------------------------------------------------------------------------- key_map
class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 2)


def test_key_map_loads_only_the_encoder_and_drops_the_rest(tmp_path):
    source = randomize(Encoder(), 1)
    Booster().save_model(source, tmp_path / "w.safetensors")
    target = randomize(Encoder(), 2)
    decoder_before = target.decoder.weight.clone()
    only_encoder = lambda key: key if key.startswith("encoder.") else None  # noqa: E731

    with pytest.raises(StateMismatchError, match="2 missing from the checkpoint: decoder.weight, decoder.bias"):
        Booster().load_model(target, tmp_path / "w.safetensors", key_map=only_encoder)
    report = Booster().load_model(target, tmp_path / "w.safetensors", strict=False, key_map=only_encoder)
    assert report.unexpected_keys == [] and sorted(report.dropped_keys) == ["decoder.bias", "decoder.weight"]
    assert report.missing_keys == ["decoder.weight", "decoder.bias"]
    assert torch.equal(target.encoder.weight, source.encoder.weight)
    assert torch.equal(target.decoder.weight, decoder_before)

    # an encoder-only model: the same map is a perfect fit
    encoder_only = nn.Module()
    encoder_only.encoder = nn.Linear(4, 4)
    assert Booster().load_model(encoder_only, tmp_path / "w.safetensors", key_map=only_encoder).ok
    assert torch.equal(encoder_only.encoder.bias, source.encoder.bias)


def test_key_map_adds_strips_and_renames(tmp_path):
    source = randomize(Encoder(), 1)
    Booster().save_model(source, tmp_path / "w.safetensors")
    wrapped = nn.Module()
    wrapped.backbone = randomize(Encoder(), 2)
    assert Booster().load_model(wrapped, tmp_path / "w.safetensors", key_map=lambda k: f"backbone.{k}").ok
    assert torch.equal(wrapped.backbone.encoder.weight, source.encoder.weight)

    Booster().save_model(wrapped, tmp_path / "wrapped.safetensors")
    plain = randomize(Encoder(), 3)
    strip = lambda k: k.removeprefix("backbone.")  # noqa: E731
    report = Booster().load_model(plain, tmp_path / "wrapped.safetensors", key_map=strip)
    assert report.ok and torch.equal(plain.decoder.bias, source.decoder.bias)

    # a dict renames the keys it names (None drops) and keeps the others
    renamed = nn.Module()
    renamed.enc = nn.Linear(4, 4)
    renamed.decoder = nn.Linear(4, 2)
    table = {"encoder.weight": "enc.weight", "encoder.bias": "enc.bias"}
    assert Booster().load_model(renamed, tmp_path / "w.safetensors", key_map=table).ok
    assert torch.equal(renamed.enc.weight, source.encoder.weight)
    assert torch.equal(renamed.decoder.weight, source.decoder.weight)
    report = Booster().load_model(renamed, tmp_path / "w.safetensors", strict=False,
                                  key_map={**table, "decoder.bias": None})  # fmt: skip
    assert report.dropped_keys == ["decoder.bias"] and report.missing_keys == ["decoder.bias"]


def test_key_map_sees_keys_without_a_wrapper_prefix(tmp_path):
    """A DDP-saved file (module.encoder.weight, ...): the map is written in the model's names."""
    source = randomize(Encoder(), 1)
    save_file({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.safetensors")
    target = randomize(Encoder(), 2)
    report = Booster().load_model(
        target, tmp_path / "ddp.safetensors", strict=False, key_map=lambda k: k if k.startswith("encoder.") else None
    )
    assert sorted(report.dropped_keys) == ["module.decoder.bias", "module.decoder.weight"]
    assert report.unexpected_keys == [] and torch.equal(target.encoder.weight, source.encoder.weight)
    # a map that removes the prefix itself works too
    assert Booster().load_model(target, tmp_path / "ddp.safetensors", key_map=lambda k: k.removeprefix("module.")).ok


def test_key_map_errors_name_the_keys(tmp_path):
    Booster().save_model(randomize(Encoder(), 1), tmp_path / "w.safetensors")
    with pytest.raises(StateMismatchError, match=r"key_map maps both '\w+.weight' and '\w+.weight' to the model's "
                       "'encoder.weight'"):  # fmt: skip
        Booster().load_model(Encoder(), tmp_path / "w.safetensors", key_map=lambda k: "encoder." + k.split(".")[-1])
    with pytest.raises(TypeError, match="key_map"):
        Booster().load_model(Encoder(), tmp_path / "w.safetensors", key_map=["encoder.weight"])
    with pytest.raises(TypeError, match=r"key_map\('\w+\.\w+'\) returned 3"):
        Booster().load_model(Encoder(), tmp_path / "w.safetensors", key_map=lambda k: 3)


def test_key_map_and_casts_through_load_into(tmp_path):
    source = randomize(Encoder(), 1)
    Booster().save_model(source, tmp_path / "w.safetensors")
    dest = {"w": torch.zeros(4, 4, dtype=torch.float16)}
    report = load_into(dest, tmp_path / "w.safetensors", strict=False,
                       key_map={"encoder.weight": "w", "encoder.bias": None, "decoder.weight": None})  # fmt: skip
    assert report.unexpected_keys == ["decoder.bias"] and [c.key for c in report.cast] == ["w"]
    assert torch.equal(dest["w"], source.encoder.weight.half())
