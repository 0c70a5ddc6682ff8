"""Two DDP ranks: a checkpoint's wrapper prefix is decided once, for all its keys.

The multi-rank load shares ``match_files_to_model`` with the single-process one; files
written by ``torch.save(ddp_model.state_dict())`` (keys ``module.``...) and by ckptio must
land under the right names in models that own a submodule called ``module``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tests.dist.harness import run_ranks
from tests.helpers import averaged_linear, two_linears
from torch.nn.parallel import DistributedDataParallel

from ckptio import Booster
from ckptio.plugins import TorchDDPPlugin

BUILDERS = {"two_linears": two_linears, "averaged": averaged_linear}


def _save_all(folder) -> None:
    for name, build in BUILDERS.items():
        ddp = DistributedDataParallel(build(seed=1))
        state = {k: v.detach().clone() for k, v in ddp.state_dict().items()}
        assert all(k.startswith("module.") for k in state)
        if dist.get_rank() == 0:
            torch.save(state, folder / f"{name}-ddp.bin")
            save_file(state, str(folder / f"{name}-ddp.safetensors"))
        booster = Booster(plugin=TorchDDPPlugin())
        model, *_ = booster.boost(build(seed=1))
        booster.save_model(model, folder / f"{name}-ckptio", shard=True, size_per_shard=0.0001)
        booster.save_model(model, folder / f"{name}-ckptio.safetensors")
        dist.barrier()


def _load_all(folder) -> dict[str, list[str]]:
    """For every file: the keys whose tensor is not the saved one (empty lists when right)."""
    wrong = {}
    for name, build in BUILDERS.items():
        expected = build(seed=1).state_dict()
        for suffix in ("-ddp.bin", "-ddp.safetensors", "-ckptio", "-ckptio.safetensors"):
            booster = Booster(plugin=TorchDDPPlugin())
            model, *_ = booster.boost(build(seed=2))
            report = booster.load_model(model, folder / f"{name}{suffix}")
            assert report.ok, f"{name}{suffix}: {report.describe()}"
            got = model.module.state_dict()
            wrong[f"{name}{suffix}"] = [k for k, v in expected.items() if not torch.equal(got[k], v)]
    return wrong


def test_ddp_files_of_models_owning_module_load_exactly_on_two_ranks(tmp_path):
    def scenario(ctx):
        ctx.phase(2, "save", lambda: _save_all(tmp_path))
        return ctx.phase(2, "load", lambda: _load_all(tmp_path))

    results = run_ranks(scenario, 2, tmp_path)
    for rank, wrong in enumerate(results):
        assert len(wrong) == 8, wrong
        assert all(keys == [] for keys in wrong.values()), (rank, wrong)
