"""A DDP load on N ranks reads each byte from storage once in all: each replicated tensor is
read by one rank (balanced by bytes) and sent to the others."""

from __future__ import annotations

import torch
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys, make_uneven

from ckptio import Booster
from ckptio.engine import reader as engine_reader
from ckptio.plugins import TorchDDPPlugin


def _load(path, world: int) -> tuple[dict[str, int], list[str]]:
    """Load on this rank, counting the bytes it copies out of weights files, by tensor key."""
    counts: dict[str, int] = {}
    real_box, real_all = engine_reader.TensorFile.read_box, engine_reader.TensorFile.copy_all
    inside_copy_all = [0]  # copy_all reads odd destinations through read_box: counted once

    def read_box(self, key, region, dest):
        if not inside_copy_all[0]:
            counts[key] = counts.get(key, 0) + region.numel * dest.element_size()
        return real_box(self, key, region, dest)

    def copy_all(self, pairs):
        for key, dest in pairs:
            counts[key] = counts.get(key, 0) + dest.numel() * dest.element_size()
        inside_copy_all[0] += 1
        try:
            return real_all(self, pairs)
        finally:
            inside_copy_all[0] -= 1

    engine_reader.TensorFile.read_box, engine_reader.TensorFile.copy_all = read_box, copy_all
    try:
        booster = Booster(plugin=TorchDDPPlugin())
        model, *_ = booster.boost(make_uneven(seed=7))
        report = booster.load_model(model, path)
    finally:
        engine_reader.TensorFile.read_box, engine_reader.TensorFile.copy_all = real_box, real_all
    assert report.ok, report.describe()
    return counts, diff_keys(model.module.state_dict(), make_uneven(seed=0).state_dict())


def test_ddp_load_reads_every_byte_once_in_all(tmp_path):
    path = tmp_path / "ck"
    Booster().save_model(make_uneven(seed=0), path, shard=True, use_safetensors=True, size_per_shard=0.0005)
    total = {k: v.numel() * v.element_size() for k, v in make_uneven(seed=0).state_dict().items()}

    def scenario(ctx):
        out = {}
        for world in (2, 3):
            result = ctx.phase(world, f"load{world}", lambda world=world: _load(path, world))
            if result is not None:
                out[world] = result
        return out

    results = run_ranks(scenario, 3, tmp_path)
    for world in (2, 3):
        per_rank = [results[r][world] for r in range(world)]
        assert all(bad == [] for _, bad in per_rank)  # every rank holds the checkpoint's values
        read = {}
        for counts, _ in per_rank:
            for key, n in counts.items():
                assert key not in read, f"{key} read by two ranks"
                read[key] = n
        assert read == total  # each tensor read once, whole
        assert all(counts for counts, _ in per_rank)  # the reading is shared between the ranks
