"""Load options on 2 ranks: dtype casts of the boxes each rank reads, and ``key_map`` (FSDP2, DDP)."""

from __future__ import annotations

import torch
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys, full_optimizer_state, full_state, make_optimizer, make_uneven, train
from torch import nn

from ckptio import Booster
from ckptio.plugins import TorchDDPPlugin, TorchFSDPPlugin


def _fsdp() -> Booster:
    return Booster(plugin=TorchFSDPPlugin(shard_classes={"Block"}))


def _save(folder, ref_path) -> None:
    booster = _fsdp()
    model = make_uneven(0)
    model, optimizer, *_ = booster.boost(model, make_optimizer(model))
    train(model, optimizer, 1, torch.distributed.get_rank())
    booster.save_model(model, folder / "model", shard=True, use_safetensors=True, size_per_shard=0.0002)
    booster.save_optimizer(optimizer, folder / "optim", shard=True, size_per_shard=0.0003)
    reference = {"model": full_state(model), "optim": full_optimizer_state(optimizer, model)[0]}
    if torch.distributed.get_rank() == 0:
        torch.save(reference, ref_path)


def _bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}


def _load_bf16(folder, ref_path, plugin: str) -> dict:
    ref = torch.load(ref_path, weights_only=True)
    model = make_uneven(5).to(torch.bfloat16)
    booster = _fsdp() if plugin == "fsdp" else Booster(plugin=TorchDDPPlugin())
    model, optimizer, *_ = booster.boost(model, make_optimizer(model))
    report = booster.load_model(model, folder / "model")
    plain = model.module if plugin == "ddp" else model
    out = {"ok": report.ok, "casts": len(report.cast), "model": diff_keys(full_state(plain), _bf16(ref["model"]))}
    booster.load_optimizer(optimizer, folder / "optim")
    state = full_optimizer_state(optimizer, plain)[0]
    expected = {k: v if k.endswith("/step") else v.to(torch.bfloat16) for k, v in ref["optim"].items()}
    out["optim"] = diff_keys(state, expected)
    return out


def test_fp32_checkpoint_loads_into_bf16_fsdp2_and_ddp(tmp_path):
    """Each rank's bf16 box holds the fp32 values cast (not bytes); optimizer state follows torch's rule."""

    def scenario(ctx):
        ctx.phase(2, "save", lambda: _save(tmp_path, tmp_path / "ref.pt"))
        return {p: ctx.phase(2, f"load-{p}", lambda p=p: _load_bf16(tmp_path, tmp_path / "ref.pt", p))
                for p in ("fsdp", "ddp")}  # fmt: skip

    results = run_ranks(scenario, 2, tmp_path)
    n_float = len(make_uneven(0).state_dict())
    for out in results:
        for plugin in ("fsdp", "ddp"):
            assert out[plugin] == {"ok": True, "casts": n_float, "model": [], "optim": []}, (plugin, out)


class Wrapped(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        self.backbone = make_uneven(seed)


def _save_plain(folder) -> None:
    booster = _fsdp()
    model, *_ = booster.boost(make_uneven(0))
    booster.save_model(model, folder, shard=True, use_safetensors=True, size_per_shard=0.0002)


def _load_mapped(folder, plugin: str) -> dict:
    saved = make_uneven(0).state_dict()
    booster = _fsdp() if plugin == "fsdp" else Booster(plugin=TorchDDPPlugin())
    wrapped, *_ = booster.boost(Wrapped(5))
    report = booster.load_model(wrapped, folder, key_map=lambda k: f"backbone.{k}")
    plain = wrapped.module if plugin == "ddp" else wrapped
    got = {k.removeprefix("backbone."): v for k, v in full_state(plain).items()}
    out = {"prefixed": (report.ok, diff_keys(got, saved))}

    booster = _fsdp() if plugin == "fsdp" else Booster(plugin=TorchDDPPlugin())
    model, *_ = booster.boost(make_uneven(6))
    fresh = make_uneven(6).state_dict()
    only_blocks = lambda k: k if k.startswith("blocks.") else None  # noqa: E731
    report = booster.load_model(model, folder, strict=False, key_map=only_blocks)
    got = full_state(model.module if plugin == "ddp" else model)
    expected = {k: saved[k] if k.startswith("blocks.") else fresh[k] for k in saved}
    out["partial"] = (report.unexpected_keys, sorted(report.missing_keys) == sorted(report.dropped_keys),
                      len(report.missing_keys), diff_keys(got, expected))  # fmt: skip
    return out


def test_key_map_adds_a_prefix_and_loads_part_on_2_ranks(tmp_path):
    def scenario(ctx):
        ctx.phase(2, "save", lambda: _save_plain(tmp_path / "model"))
        return {p: ctx.phase(2, f"load-{p}", lambda p=p: _load_mapped(tmp_path / "model", p)) for p in ("fsdp", "ddp")}

    results = run_ranks(scenario, 2, tmp_path)
    not_blocks = [k for k in make_uneven(0).state_dict() if not k.startswith("blocks.")]
    for out in results:
        for plugin in ("fsdp", "ddp"):
            assert out[plugin] == {"prefixed": (True, []), "partial": ([], True, len(not_blocks), [])}, (plugin, out)
