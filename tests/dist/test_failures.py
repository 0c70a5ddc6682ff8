"""One failing rank makes every rank raise the same error, and the old checkpoint survives."""

from __future__ import annotations

import pytest
import torch
from tests.dist.faults import fail_writes
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys, make_uneven

from ckptio import Booster, DistributedCheckpointError
from ckptio.errors import CheckpointWriteError
from ckptio.plugins import TorchDDPPlugin, TorchFSDPPlugin


@pytest.mark.parametrize("plugin", ["ddp", "fsdp"])
def test_write_failure_on_one_rank_raises_on_all_and_keeps_old_checkpoint(tmp_path, plugin):
    ck = tmp_path / "ck"

    def make_booster():
        return Booster(plugin=TorchDDPPlugin() if plugin == "ddp" else TorchFSDPPlugin(shard_classes={"Block"}))

    def save(seed, fail_rank=None):
        booster = make_booster()
        model, *_ = booster.boost(make_uneven(seed))
        if fail_rank == torch.distributed.get_rank():

            fail_writes(CheckpointWriteError("write failed (disk full)", path="injected"))
        try:
            booster.save_model(model, ck, shard=True, use_safetensors=True, size_per_shard=0.0002)
        except DistributedCheckpointError as exc:
            return str(exc)
        return None

    def scenario(ctx):
        ctx.phase(3, "first", lambda: save(0))
        message = ctx.phase(3, "second", lambda: save(1, fail_rank=1))
        return message

    messages = run_ranks(scenario, 3, tmp_path)
    assert all(m is not None and "rank 1" in m and "disk full" in m for m in messages), messages
    assert len(set(messages)) == 1  # the same error everywhere
    plain = make_uneven(9)
    Booster().load_model(plain, ck, verify=True)
    assert diff_keys(plain.state_dict(), make_uneven(0).state_dict()) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_collective_step_reports_every_failed_rank_on_all_ranks(tmp_path):
    from ckptio.engine.group import Group, collective_step

    def step(rank, fail_on):
        if rank in fail_on:
            raise ValueError(f"boom on {rank}")
        return rank * 10

    def scenario(ctx):
        def fn():
            group, rank = Group(), torch.distributed.get_rank()
            out = {"gather": collective_step(group, "ok step", lambda: step(rank, ()), gather=True)}
            for fail_on in ((1,), (0, 2)):
                try:
                    collective_step(group, "bad step", lambda f=fail_on: step(rank, f))
                except DistributedCheckpointError as exc:
                    out[fail_on] = str(exc)
            try:  # an inner failure is raised unchanged by the outer step
                collective_step(group, "outer", lambda: collective_step(group, "inner", lambda: step(rank, (2,))))
            except DistributedCheckpointError as exc:
                out["nested"] = str(exc)
            return out

        return ctx.phase(3, "steps", fn)

    results = run_ranks(scenario, 3, tmp_path)
    assert all(r == results[0] for r in results)  # the same errors everywhere
    out = results[0]
    assert out["gather"] == [0, 10, 20]
    assert out[(1,)] == "bad step failed on 1 of 3 ranks: rank 1: ValueError: boom on 1"
    assert (
        out[(0, 2)] == "bad step failed on 2 of 3 ranks: rank 0: ValueError: boom on 0; rank 2: ValueError: boom on 2"
    )
    assert out["nested"] == "inner failed on 1 of 3 ranks: rank 2: ValueError: boom on 2"
