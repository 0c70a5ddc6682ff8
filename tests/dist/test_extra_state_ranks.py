"""Modules' extra state and stateful objects on several ranks (FSDP2, gloo): a training checkpoint saved
on 2 ranks restores a dict and a tensor extra state and an EMA of the sharded weights (DTensors, laid out
like the live ones) on 2 ranks and on 1."""

from __future__ import annotations

import torch
from tests.dist.harness import run_ranks
from tests.dist.models import make_uneven
from tests.model.test_extra_state import FP8Blob, FP8Recipe

from ckptio import Booster
from ckptio.plugins import TorchFSDPPlugin
from ckptio.training import load_checkpoint, save_checkpoint


class ShardedEMA:
    """An EMA of the (sharded) parameters: its tensors are DTensors under FSDP2."""

    def __init__(self, model) -> None:
        self.num_updates = 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = state["num_updates"]
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)


def _job(seed: int):
    model = make_uneven(seed)
    model.recipe = FP8Recipe(with_linear=False)
    model.blob = FP8Blob()
    booster = Booster(plugin=TorchFSDPPlugin(shard_classes={"Block"}))
    model, *_ = booster.boost(model)
    return booster, model, ShardedEMA(model)


def _full(ema: ShardedEMA) -> dict[str, list]:
    from torch.distributed.tensor import DTensor

    assert all(isinstance(v, DTensor) for v in ema.shadow.values())
    return {n: v.full_tensor().tolist() for n, v in ema.shadow.items()}


def _scenario(ctx):
    ck = ctx.workdir / "runs"

    def save():
        booster, model, ema = _job(0)
        model.recipe.meta = {"recipe": "hybrid", "amax": torch.tensor([2.5, 0.5]), "dims": (16, 32)}
        model.blob.blob = b"fp8-meta:" + bytes(range(40))
        with torch.no_grad():
            for v in ema.shadow.values():
                v.mul_(0.5)
        ema.num_updates = 5
        save_checkpoint(ck, booster, model, None, None, 0, 5, 2, stateful={"ema": ema})
        return _full(ema)

    def load():
        booster, model, ema = _job(7)
        load_checkpoint(ck / "epoch-0_step-5", booster, model, None, None, stateful={"ema": ema})
        meta = model.recipe.meta
        assert meta["dims"] == (16, 32) and torch.equal(meta["amax"], torch.tensor([2.5, 0.5]))
        assert model.blob.blob == b"fp8-meta:" + bytes(range(40))
        assert ema.num_updates == 5
        return _full(ema)

    saved = ctx.phase(2, "save", save)
    return saved, ctx.phase(2, "load2", load), ctx.phase(1, "load1", load)


def test_extra_state_and_stateful_objects_on_fsdp_ranks(tmp_path):
    results = run_ranks(_scenario, 2, tmp_path)
    saved = results[0][0]
    assert results[1][0] == saved
    assert results[0][1] == saved and results[1][1] == saved  # 2 ranks -> 2 ranks
    assert results[0][2] == saved  # 2 ranks -> 1 rank
