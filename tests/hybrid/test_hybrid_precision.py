"""HybridParallelPlugin's ColossalAI arguments on 2 ranks (dp=1, tp=2): ``max_norm`` clips
gradients that torch's ``clip_grad_norm_`` cannot combine (tensor-parallel DTensors beside plain
tensors) like one process does; ``precision="bf16"`` computes in bf16 over fp32 master weights, which the
checkpoint holds; ``zero_stage`` and ``no_sync`` apply to the data-parallel FSDP2."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo  # noqa: F401 (FSDP2 imports it lazily: once here, not in every forked rank)
from tests.dist.harness import run_ranks
from tests.dist.models import full_state, make_uneven
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from ckptio import Booster

pytestmark = pytest.mark.dist

PLAN = {"blocks.*.up": ColwiseParallel(), "blocks.*.down": RowwiseParallel()}
BATCH = torch.arange(12).reshape(3, 4) % 13


def _sgd_step(model, max_norm: float = 0.0) -> None:
    """One SGD step (lr 1: the update is the clipped gradient itself)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(BATCH).square().mean().backward()
    if max_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()


def _clipped_on_two_meshes():
    from ckptio.plugins import HybridParallelPlugin

    model = make_uneven(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    booster = Booster(plugin=HybridParallelPlugin(tp_size=2, tp_plan=PLAN, max_norm=0.05))
    model, optimizer, *_ = booster.boost(model, optimizer)
    meshes = {getattr(p, "device_mesh", None) and p.device_mesh.mesh_dim_names for p in model.parameters()}
    model(BATCH).square().mean().backward()
    optimizer.step()
    return meshes, full_state(model)


def _bf16(folder):
    from torch.distributed.fsdp import FSDPModule

    from ckptio.plugins import HybridParallelPlugin

    plugin = HybridParallelPlugin(tp_size=2, tp_plan=PLAN, precision="bf16", zero_stage=1)
    model = make_uneven(0).to(torch.bfloat16)  # as ColossalChat loads it: torch_dtype=torch.bfloat16
    booster = Booster(plugin=plugin)
    model, optimizer, *_ = booster.boost(model, torch.optim.AdamW(model.parameters(), lr=0.01))
    seen = []
    model.blocks[0].up.register_forward_pre_hook(lambda m, args: seen.append((m.weight.dtype, args[0].dtype)))
    with booster.no_sync(model):  # an FSDP2 module even at dp=1: it carries the mixed precision
        model(BATCH).float().square().mean().backward()
    optimizer.step()
    booster.save_model(model, folder, shard=True, use_safetensors=True)
    stored = {p.dtype for p in model.parameters()}
    return isinstance(model, FSDPModule), plugin.fsdp_kwargs["reshard_after_forward"], seen, stored, full_state(model)


def test_hybrid_max_norm_and_bf16(tmp_path):
    def scenario(ctx):
        return ctx.phase(2, "clip", _clipped_on_two_meshes), ctx.phase(2, "bf16", lambda: _bf16(tmp_path / "bf16"))

    plain = make_uneven(0)
    _sgd_step(plain)
    unclipped = plain.state_dict()
    reference = make_uneven(0)
    _sgd_step(reference, max_norm=0.05)
    results = run_ranks(scenario, 2, tmp_path)
    for (meshes, clipped), (fsdp, reshard, seen, stored, _) in results:
        assert meshes == {("tp",), None}  # DTensors on tp beside plain tensors: torch's clip_grad_norm_ cannot mix them
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(clipped[name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.allclose(unclipped["emb.weight"], clipped["emb.weight"])  # clipping changed the step
        assert fsdp and reshard is False
        assert seen == [(torch.bfloat16, torch.bfloat16)]  # bf16 compute ...
        assert stored == {torch.float32}  # ... over fp32 master weights, though the model came in bf16
    loaded = make_uneven(3)
    loaded.register_buffer("scale", loaded.scale.bfloat16())  # buffers keep the dtype the model came in
    Booster().load_model(loaded, tmp_path / "bf16")  # the fp32 master weights, in one process
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in results[0][1][4].items())
