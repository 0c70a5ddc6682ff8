"""FSDP2 model + AdamW state: saved at 2 and 4 ranks, loaded at 1, 2, 3 and 4 ranks and into
a plain single-process optimizer, equal to the saving run's full state (torch.equal)."""

from __future__ import annotations

import torch
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys, full_optimizer_state, full_state, make_optimizer, make_uneven, train

from ckptio import Booster
from ckptio.plugins import TorchFSDPPlugin


def _boosted(seed: int):
    from torch.distributed.tensor import DTensor

    model = make_uneven(seed)
    optimizer = make_optimizer(model)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    booster = Booster(plugin=TorchFSDPPlugin(shard_classes={"Block"}))
    model, optimizer, *_ = booster.boost(model, optimizer)
    # the optimizer built on the unsharded model now steps the sharded parameters, same settings
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == settings
    assert optimizer.param_groups[0]["params"][0] is model.emb.weight
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == [id(p) for p in model.parameters()]
    assert all(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])
    return booster, model, optimizer


def _save(folder, ref_path) -> None:
    booster, model, optimizer = _boosted(0)
    train(model, optimizer, 3, torch.distributed.get_rank())
    booster.save_model(model, folder / "model", shard=True, use_safetensors=True, size_per_shard=0.0002)
    booster.save_optimizer(optimizer, folder / "optim", shard=True, size_per_shard=0.0003)
    booster.save_optimizer(optimizer, folder / "optim.pt")  # one torch file, gathered on the master
    reference = {"model": full_state(model), "optim": full_optimizer_state(optimizer, model)}
    if torch.distributed.get_rank() == 0:
        torch.save(reference, ref_path)


def _compare(model, optimizer, ref_path) -> list[str]:
    ref = torch.load(ref_path, weights_only=True)
    state, groups = full_optimizer_state(optimizer, model)
    bad = diff_keys(full_state(model), ref["model"]) + diff_keys(state, ref["optim"][0])
    if groups != ref["optim"][1]:
        bad.append(f"param groups {groups} != {ref['optim'][1]}")
    return bad


def _load(folder, ref_path, optim_name: str) -> list[str]:
    booster, model, optimizer = _boosted(5)
    booster.load_model(model, folder / "model")
    booster.load_optimizer(optimizer, folder / optim_name)
    bad = _compare(model, optimizer, ref_path)
    train(model, optimizer, 1, torch.distributed.get_rank(), start=3)  # the loaded DTensor state is usable
    return bad


def test_fsdp_model_and_adamw_state_reshard(tmp_path):
    folders = {ws: tmp_path / f"saved{ws}" for ws in (2, 4)}
    refs = {ws: tmp_path / f"ref{ws}.pt" for ws in (2, 4)}
    plan = {2: [(1, "optim"), (3, "optim"), (4, "optim.pt")], 4: [(2, "optim"), (1, "optim.pt")]}

    def scenario(ctx):
        out = {}
        for saved, loads in plan.items():
            ctx.phase(saved, f"save{saved}", lambda s=saved: _save(folders[s], refs[s]))
            for ws, name in loads:
                bad = ctx.phase(ws, f"load{saved}-{ws}-{name}", lambda s=saved, n=name: _load(folders[s], refs[s], n))
                if bad is not None:
                    out[f"{saved}->{ws} {name}"] = bad
        return out

    results = run_ranks(scenario, 4, tmp_path)
    assert len(results[0]) == 5 and all(bad == [] for out in results for bad in out.values()), results

    # a plain single-process model and optimizer read the FSDP2 checkpoint
    for saved in (2, 4):
        model = make_uneven(7)
        optimizer = make_optimizer(model)
        booster = Booster()
        model, optimizer, *_ = booster.boost(model, optimizer)
        booster.load_model(model, folders[saved] / "model")
        booster.load_optimizer(optimizer, folders[saved] / "optim")
        assert _compare(model, optimizer, refs[saved]) == []
