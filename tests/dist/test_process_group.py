"""Plugins reuse the user's process group, init from torchrun's environment, or make a world of one."""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed as dist
from tests.dist.harness import run_ranks

from ckptio.plugins.process_group import default_backend, ensure_process_group


def test_world_of_one_without_environment(tmp_path):
    def scenario(ctx):
        for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
            os.environ.pop(var, None)
        group = ensure_process_group()
        again = ensure_process_group()
        return dist.get_world_size(), group is again, dist.get_backend()

    assert run_ranks(scenario, 1, tmp_path) == [(1, True, default_backend())]


def test_env_init_like_torchrun_and_reuse_of_user_group(tmp_path):
    # The parent hosts the store on a free port (no collision), as torchrun's agent does.
    store = dist.TCPStore(
        "127.0.0.1", 0, world_size=2, is_master=True, timeout=timedelta(seconds=60), wait_for_workers=False
    )

    def scenario(ctx):
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(store.port),
            RANK=str(ctx.rank),
            WORLD_SIZE="2",
            TORCHELASTIC_USE_AGENT_STORE="True",
        )
        ensure_process_group()
        sub = dist.new_group([0, 1])
        assert ensure_process_group(sub) is sub  # the user's group is used as is
        return dist.get_rank(), dist.get_world_size()

    assert run_ranks(scenario, 2, tmp_path) == [(0, 2), (1, 2)]
