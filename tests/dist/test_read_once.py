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
    real = engine_reader.TensorFile.read_box

    def read_box(self, key, region, dest):
        counts[key] = counts.get(key, 0) + region.numel * dest.element_size()
        return real(self, key, region, dest)

    engine_reader.TensorFile.read_box = read_box
    try:
        booster = Booster(plugin=TorchDDPPlugin())
        model, *_ = booster.boost(make_uneven(seed=7))
        report = booster.load_model(model, path)
    finally:
        engine_reader.TensorFile.read_box = real
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
