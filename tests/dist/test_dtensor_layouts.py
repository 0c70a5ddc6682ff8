"""The DTensor engine is generic over layouts: 2-D meshes, Shard on dim 0 and 1 (uneven),
Replicate, and resharding between them (what a tensor-parallel plugin relies on)."""

from __future__ import annotations

import torch
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys
from torch import nn

from ckptio import Booster
from ckptio.checkpoint_io.distributed import DistributedCheckpointIO


def _make(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 10), nn.ReLU(), nn.Linear(10, 3), nn.Embedding(4, 40000))
    model.register_buffer("counter", torch.tensor(seed))
    return model


def _distribute(model: nn.Module, mesh, layout: dict[str, list]) -> nn.Module:
    from torch.distributed.tensor import distribute_tensor

    for name, placements in layout.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        full = getattr(module, attr).detach()
        setattr(module, attr, nn.Parameter(distribute_tensor(full, mesh, placements)))
    return model


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v.clone() for k, v in model.state_dict().items()}


def test_dtensor_2d_mesh_shard_any_dim_and_reshard(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    ck = tmp_path / "tp"
    save_layout = {
        "0.weight": [Shard(0), Shard(1)],
        "0.bias": [Replicate(), Shard(0)],
        "2.weight": [Shard(1), Replicate()],
        "2.bias": [Replicate(), Replicate()],
        "3.weight": [Replicate(), Shard(1)],  # long strided runs: read run by run
    }
    load_layouts = {
        3: {"0.weight": [Shard(1)], "0.bias": [Shard(0)], "2.weight": [Shard(0)], "3.weight": [Shard(1)]},
        4: {
            "0.weight": [Shard(1), Shard(0)],
            "0.bias": [Shard(0), Replicate()],
            "2.weight": [Replicate(), Shard(1)],
            "3.weight": [Shard(0), Shard(1)],
        },
    }

    def save():
        mesh = init_device_mesh("cpu", (2, 2))
        model = _distribute(_make(0), mesh, save_layout)
        DistributedCheckpointIO().save_model(model, ck, shard=True, use_safetensors=True, size_per_shard=0.001)

    def load(ws):
        mesh = init_device_mesh("cpu", (2, 2) if ws == 4 else (ws,))
        model = _distribute(_make(7), mesh, load_layouts[ws])
        io = DistributedCheckpointIO()
        assert io.load_model(model, ck) is model  # as ColossalAI's CheckpointIO.load_model
        report = io.last_load_report
        assert report.ok, report.describe()
        return diff_keys(_full(model), _make(0).state_dict())

    def scenario(ctx):
        ctx.phase(4, "save", save)
        return [ctx.phase(ws, f"load{ws}", lambda ws=ws: load(ws)) for ws in (3, 4)]

    results = run_ranks(scenario, 4, tmp_path)
    assert results[0] == [[], []] and results[3] == [None, []], results
    plain = _make(11)
    Booster().load_model(plain, ck)
    assert diff_keys(plain.state_dict(), _make(0).state_dict()) == []


def test_fsdp2_over_tensor_parallel_strided_shards(tmp_path):
    """FSDP2 on top of TP gives ``_StridedShard`` (not one box per rank): saved and loaded through
    full tensors, still equal, still loadable in one plain process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    ck = tmp_path / "fsdp_tp"

    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 6))

    def build(seed):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model = make(seed)
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        return fully_shard(model, mesh=mesh["dp"])

    def save():
        model = build(0)
        assert "_StridedShard" in str(model[0].weight.placements)
        DistributedCheckpointIO().save_model(model, ck, shard=True, use_safetensors=True, size_per_shard=0.0001)

    def load():
        model = build(3)
        DistributedCheckpointIO().load_model(model, ck)
        return diff_keys(_full(model), make(0).state_dict())

    def scenario(ctx):
        ctx.phase(4, "save", save)
        return ctx.phase(4, "load", load)

    assert run_ranks(scenario, 4, tmp_path) == [[], [], [], []]
    plain = make(5)
    Booster().load_model(plain, ck)
    assert diff_keys(plain.state_dict(), make(0).state_dict()) == []
