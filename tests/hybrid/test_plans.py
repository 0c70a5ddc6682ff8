"""Tensor-parallel plans, checked in one process (no process group needed)."""

from __future__ import annotations

import pytest
from tests.hybrid.models import tiny_gpt2, tiny_llama
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from ckptio.plugins.hybrid import default_tp_plan, resolve_tp_plan


def test_default_llama_plan_covers_every_projection():
    model = tiny_llama()
    resolved = resolve_tp_plan(model, default_tp_plan(model), 2)
    assert len(resolved) == 2 * 7  # q, k, v, o, gate, up, down in each of the two layers
    assert isinstance(resolved["model.layers.1.self_attn.q_proj"], ColwiseParallel)
    assert isinstance(resolved["model.layers.0.mlp.down_proj"], RowwiseParallel)
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in resolved)  # replicated: no padding


def test_default_gpt2_plan_shards_the_mlp_only():
    model = tiny_gpt2()
    resolved = resolve_tp_plan(model, default_tp_plan(model), 2)
    assert sorted(resolved) == [f"transformer.h.{i}.mlp.{m}" for i in (0, 1) for m in ("c_fc", "c_proj")]


def test_dimensions_not_divisible_by_tp_size_are_named():
    model = tiny_llama()  # intermediate_size=18, num_key_value_heads=2
    with pytest.raises(ValueError, match=r"tp_size=4 does not divide .*mlp.gate_proj.out_features=18"):
        resolve_tp_plan(model, default_tp_plan(model), 4)
    with pytest.raises(ValueError, match=r"config.num_key_value_heads=2"):
        resolve_tp_plan(model, default_tp_plan(model), 4)


def test_plan_typos_and_unknown_models_are_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"'\*layers.\*.mlp.gate' matches no module"):
        resolve_tp_plan(model, {"*layers.*.mlp.gate": ColwiseParallel()}, 2)
    with pytest.raises(ValueError, match=r"no default tensor-parallel plan for Sequential .*tp_plan="):
        default_tp_plan(nn.Sequential(nn.Linear(4, 4)))


def test_user_plan_on_a_plain_module():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
    resolved = resolve_tp_plan(model, {"0": ColwiseParallel(), "2": RowwiseParallel()}, 2)
    assert set(resolved) == {"0", "2"}
    with pytest.raises(ValueError, match=r"0.out_features=6"):
        resolve_tp_plan(model, {"0": ColwiseParallel()}, 4)
