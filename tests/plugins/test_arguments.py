"""ColossalAI's constructor arguments: what ckptio cannot honour raises, naming the argument and
the alternative, before any process group exists (one process, no ranks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ckptio import Booster, GeneralCheckpointIO
from ckptio.plugins import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin, Plugin


class _Passthrough(Plugin):
    """A plugin that wraps nothing (no process group), to test the Booster's own checks."""

    def configure(self, model, optimizer, criterion, dataloader, lr_scheduler):
        return model, optimizer, criterion, dataloader, lr_scheduler

    def get_checkpoint_io(self):
        return GeneralCheckpointIO()


class _WithPrecision(_Passthrough):
    precision = "bf16"


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: LowLevelZeroPlugin(), NotImplementedError, r"precision='fp16'.*loss scaling.*precision='bf16'"),
        (lambda: GeminiPlugin(), NotImplementedError, r"GeminiPlugin\(precision='fp16'\).*precision='bf16'"),
        (lambda: HybridParallelPlugin(1, precision="fp16"), NotImplementedError, r"precision='fp16'"),
        (lambda: LowLevelZeroPlugin(precision="fp64"), ValueError, r"precision='fp64'.*\['fp32', 'bf16'\]"),
        (lambda: LowLevelZeroPlugin(stage=3, precision="bf16"), ValueError, r"stage=3.*GeminiPlugin"),
        (lambda: LowLevelZeroPlugin(precision="bf16", max_norm=-1.0), ValueError, r"max_norm=-1.0"),
        (
            lambda: LowLevelZeroPlugin(precision="bf16", overlap_communication=False),
            NotImplementedError,
            r"overlap_communication=False.*FSDP2",
        ),
        (
            lambda: LowLevelZeroPlugin(precision="bf16", extra_dp_size=2),
            NotImplementedError,
            r"extra_dp_size=2.*TorchFSDPPlugin\(mesh=",
        ),
        (lambda: LowLevelZeroPlugin(precision="bf16", use_fp8=True), NotImplementedError, r"use_fp8=True"),
        (lambda: GeminiPlugin(precision="bf16", placement_policy="cuda"), ValueError, r"placement_policy='cuda'"),
        (
            lambda: GeminiPlugin(precision="bf16", shard_param_frac=0.5),
            NotImplementedError,
            r"shard_param_frac=0.5.*every parameter or none",
        ),
        (
            lambda: GeminiPlugin(precision="bf16", offload_param_frac=1.0),
            NotImplementedError,
            r"offload_param_frac=1.0, offload_optim_frac=0.0.*use offload_optim_frac=1.0",
        ),
        (
            lambda: GeminiPlugin(precision="bf16", placement_policy="auto", offload_optim_frac=1.0),
            ValueError,
            r"offload_optim_frac=1.0\) applies to placement_policy='static' only",
        ),
        (
            lambda: GeminiPlugin(precision="bf16", enable_flash_attention=True),
            NotImplementedError,
            r"enable_flash_attention=True.*attn_implementation='sdpa'",
        ),
        (
            lambda: GeminiPlugin(precision="bf16", tp_size=2),
            NotImplementedError,
            r"tp_size=2.*HybridParallelPlugin\(tp_size=",
        ),
        (lambda: GeminiPlugin(precision="bf16", hidden_dim=1024), NotImplementedError, r"hidden_dim=1024.*no chunks"),
        (lambda: HybridParallelPlugin(1, zero_stage=3), ValueError, r"zero_stage=3.*0, 1 or 2"),
        (
            lambda: HybridParallelPlugin(1, precision="bf16", fsdp_kwargs={"mp_policy": None}),
            ValueError,
            r"fsdp_kwargs sets \['mp_policy'\].*pass one or the other",
        ),
        (
            lambda: Booster(mixed_precision="fp16"),
            NotImplementedError,
            r"mixed_precision='fp16'.*torch.autocast.*torch.amp.GradScaler",
        ),
        (
            lambda: Booster(mixed_precision="bf16"),
            NotImplementedError,
            r"mixed_precision='bf16'.*precision='bf16' of LowLevelZeroPlugin, GeminiPlugin or HybridParallelPlugin",
        ),
        (
            lambda: Booster(mixed_precision="bf16", plugin=_WithPrecision()),
            ValueError,
            r"_WithPrecision sets the precision itself; pass precision='bf16' to _WithPrecision",
        ),
        (
            lambda: Booster(device="cuda", plugin=_Passthrough()),
            ValueError,
            r"device='cuda'.*_Passthrough places the model on this rank's device \(cpu",
        ),
    ],
)
def test_unsupported_arguments_raise_naming_them(make, error, message):
    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("the plugin's device is cuda here: device='cuda' is accepted")
    with pytest.raises(error, match=message):
        make()


def test_booster_device_moves_the_model_without_a_plugin():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, *_ = Booster(device="meta").boost(model, optimizer)
    assert all(p.device.type == "meta" for p in model.parameters())
    # the move made new parameters: the optimizer steps them, not the old CPU ones
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    assert Booster(device="cpu", plugin=_Passthrough()).device == "cpu"  # the plugin's own device: accepted


def test_no_sync_without_a_plugin_is_plain_accumulation():
    torch.manual_seed(0)
    model, twin = nn.Linear(3, 2), nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    booster = Booster()
    with booster.no_sync(model, optimizer=None):
        model(x).sum().backward()
    model(y).sum().backward()
    twin(x).sum().backward()
    twin(y).sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters()))
    with pytest.raises(ValueError, match=r"no_sync\(model=None\): pass the model"):
        booster.no_sync()
    with pytest.raises(ValueError, match=r"Linear passed is neither DDP nor FSDP2; pass the model that"):
        Booster(plugin=_Passthrough()).no_sync(model)
