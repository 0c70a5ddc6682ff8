"""The plugins ColossalChat's scripts pick (zero2, zero2_cpu, gemini, gemini_auto) on 2 ranks:
train, save a model, an optimizer (its state sharded per rank) and a training checkpoint, then
load them (a) into the same plugin at 2 ranks, where training goes on with the uninterrupted
run's losses, (b) in one plain process and (c) under another plugin, all bit for bit; plus
``booster.no_sync`` and ``max_norm`` against the torch calls they stand for."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo  # noqa: F401 (FSDP2 imports it lazily: once here, not in every forked rank)
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys, full_optimizer_state, full_state, make_optimizer, make_uneven

from ckptio import Booster
from ckptio.plugins import GeminiPlugin, LowLevelZeroPlugin, TorchDDPPlugin, TorchFSDPPlugin
from ckptio.training import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.dist

STEPS, SPLIT = 5, 3
BLOCKS = {"shard_classes": {"Block"}}

# ColossalChat's choices (train_sft.py), with bf16 where the script's default is, and clipping
PLUGINS = {
    "zero2": lambda: LowLevelZeroPlugin(stage=2, precision="bf16", initial_scale=2**16, max_norm=0.05, **BLOCKS),
    "zero2_cpu": lambda: LowLevelZeroPlugin(stage=2, precision="fp32", cpu_offload=True, max_norm=0.05, **BLOCKS),
    "gemini": lambda: GeminiPlugin(precision="bf16", placement_policy="static", max_norm=0.05, **BLOCKS),
    "gemini_auto": lambda: GeminiPlugin(precision="bf16", placement_policy="auto", **BLOCKS),
}
OTHER = {"zero2": "gemini", "gemini_auto": "zero2_cpu"}  # between them, every feature of the four


def _boost(kind: str, seed: int = 0):
    model = make_uneven(seed)
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    booster = Booster(plugin=PLUGINS[kind]())
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    return booster, model, optimizer, scheduler


def _batch(rank: int, step: int, micro: int = 0) -> torch.Tensor:
    return torch.randint(0, 13, (3, 4), generator=torch.Generator().manual_seed(1000 * rank + 10 * step + micro))


def _train(booster, model, optimizer, scheduler, steps: range) -> list[float]:
    losses = []
    for step in steps:
        loss = model(_batch(torch.distributed.get_rank(), step)).float().square().mean()
        booster.backward(loss, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(loss.item())
    return losses


def _state(model, optimizer) -> dict:
    model = getattr(model, "module", model)  # DDP's
    return {"model": full_state(model), "optim": full_optimizer_state(optimizer, model)}


def _bad(state: dict, ref: dict) -> list[str]:
    bad = diff_keys(state["model"], ref["model"]) + diff_keys(state["optim"][0], ref["optim"][0])
    return bad + ([] if state["optim"][1] == ref["optim"][1] else ["param groups"])


@pytest.mark.parametrize("kind", sorted(OTHER))
def test_checkpoints_load_anywhere_and_resume_exactly(tmp_path, kind):
    ck = tmp_path / "ck"

    def straight():  # uninterrupted, saving on the way
        booster, model, optimizer, scheduler = _boost(kind)
        losses = _train(booster, model, optimizer, scheduler, range(SPLIT))
        booster.save_model(model, ck / "model", shard=True, use_safetensors=True, size_per_shard=0.0002)
        booster.save_optimizer(optimizer, ck / "optim", shard=True, size_per_shard=0.0003)
        save_checkpoint(ck / "run", booster, model, optimizer, scheduler, 0, SPLIT, 3, size_per_shard=0.0003)
        saved = _state(model, optimizer)
        return losses + _train(booster, model, optimizer, scheduler, range(SPLIT, STEPS)), saved

    def resume():  # (a) the same plugin at 2 ranks, from the training checkpoint
        booster, model, optimizer, scheduler = _boost(kind, seed=5)
        position = load_checkpoint(ck / "run" / f"epoch-0_step-{SPLIT}", booster, model, optimizer, scheduler)
        loaded = _state(model, optimizer)
        return position, loaded, _train(booster, model, optimizer, scheduler, range(SPLIT, STEPS))

    def other():  # (c) another plugin at 2 ranks, from the model and optimizer folders
        booster, model, optimizer, _ = _boost(OTHER[kind], seed=5)
        booster.load_model(model, ck / "model")
        booster.load_optimizer(optimizer, ck / "optim")
        return _state(model, optimizer)

    def scenario(ctx):
        return [ctx.phase(2, name, fn) for name, fn in
                (("straight", straight), ("resume", resume), ("other", other))]  # fmt: skip

    for rank, ((losses, saved), (position, loaded, resumed), elsewhere) in enumerate(run_ranks(scenario, 2, tmp_path)):
        assert position == (0, SPLIT, SPLIT * 3)
        assert _bad(loaded, saved) == [], f"rank {rank}: same plugin"
        assert resumed == losses[SPLIT:], f"rank {rank}: the resumed run's losses differ from the uninterrupted run"
        assert _bad(elsewhere, saved) == [], f"rank {rank}: {OTHER[kind]}"
        assert len(saved["optim"][0]) == 3 * len(saved["model"]) - 3  # exp_avg, exp_avg_sq, step; no buffer

    # (b) one plain process: the files hold full tensors by name, whatever the plugin's precision
    for source in ("folders", "training checkpoint"):
        model = make_uneven(7)
        booster = Booster()
        model, optimizer, *_ = booster.boost(model, make_optimizer(model))
        if source == "folders":
            booster.load_model(model, ck / "model")
            booster.load_optimizer(optimizer, ck / "optim")
        else:
            with pytest.warns(UserWarning, match="saved on 2 ranks and is loaded on 1"):
                load_checkpoint(ck / "run" / f"epoch-0_step-{SPLIT}", booster, model, optimizer, None)
        assert _bad(_state(model, optimizer), saved) == [], source


def _full_grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    model = getattr(model, "module", model)  # DDP's
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()}  # fmt: skip


# fp32, so that the plain model's gradients are the reference
NO_SYNC = {
    "ddp": lambda: TorchDDPPlugin(),
    "fsdp": lambda: TorchFSDPPlugin(**BLOCKS),
    "zero1": lambda: LowLevelZeroPlugin(stage=1, precision="fp32", **BLOCKS),
    "zero2_cpu": lambda: LowLevelZeroPlugin(stage=2, precision="fp32", cpu_offload=True, **BLOCKS),
    "gemini_auto": lambda: GeminiPlugin(precision="fp32", placement_policy="auto", **BLOCKS),
}


def _accumulate(kind: str) -> list[str]:
    """Two micro-batches, the first inside ``booster.no_sync``: nothing is reduced inside; then
    the gradients are the mean over ranks of each rank's summed local gradients (a plain model's;
    halving is exact, so bit for bit)."""
    from torch.distributed.tensor import DTensor

    rank = torch.distributed.get_rank()
    plain = make_uneven(0)
    booster = Booster(plugin=NO_SYNC[kind]())
    model, *_ = booster.boost(copy.deepcopy(plain))
    plain(_batch(rank, 0, 0)).square().mean().backward()
    first = {n: p.grad.clone() for n, p in plain.named_parameters()}
    plain(_batch(rank, 0, 1)).square().mean().backward()
    bad = []
    with booster.no_sync(model, optimizer=None):
        model(_batch(rank, 0, 0)).square().mean().backward()
        for name, p in getattr(model, "module", model).named_parameters():
            if isinstance(p, DTensor) and p.grad is not None:
                bad.append(f"{name}: reduce-scattered inside no_sync")
            elif not isinstance(p, DTensor) and not torch.equal(p.grad, first[name]):
                bad.append(f"{name}: not this rank's own gradient inside no_sync")
    model(_batch(rank, 0, 1)).square().mean().backward()
    expected = {}
    for name, p in plain.named_parameters():
        both = [torch.empty_like(p.grad) for _ in range(2)]
        torch.distributed.all_gather(both, p.grad)
        expected[name] = (both[0] + both[1]) / 2
    return bad + diff_keys(_full_grads(model), expected)


def test_no_sync_accumulates_locally_then_averages(tmp_path):
    def scenario(ctx):
        return {kind: ctx.phase(2, kind, lambda k=kind: _accumulate(k)) for kind in NO_SYNC}

    for result in run_ranks(scenario, 2, tmp_path):
        assert result == {kind: [] for kind in NO_SYNC}


def _clipped(manual: bool) -> dict:
    """Two bf16 steps of LowLevelZeroPlugin clipping at 0.05: by the plugin (``max_norm``) or by
    hand (``torch.nn.utils.clip_grad_norm_`` before ``step()``)."""
    plugin = LowLevelZeroPlugin(stage=2, precision="bf16", max_norm=0.0 if manual else 0.05, **BLOCKS)
    booster = Booster(plugin=plugin)
    model = make_uneven(0)
    model, optimizer, *_ = booster.boost(model, make_optimizer(model))
    norms = []
    for step in range(2):
        model(_batch(torch.distributed.get_rank(), step)).square().mean().backward()
        if manual:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05).full_tensor().item())
        optimizer.step()
        optimizer.zero_grad()
    return {**_state(model, optimizer), "norms": norms}


def test_max_norm_clips_in_step_like_clip_grad_norm(tmp_path):
    def scenario(ctx):
        return ctx.phase(2, "plugin", lambda: _clipped(False)), ctx.phase(2, "manual", lambda: _clipped(True))

    for by_plugin, by_hand in run_ranks(scenario, 2, tmp_path):
        assert min(by_hand["norms"]) > 0.05  # the clipping did something
        assert _bad(by_plugin, by_hand) == []
