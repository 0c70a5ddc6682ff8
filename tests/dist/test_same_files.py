"""The files of a save do not depend on how many ranks wrote them: the same model, optimizer
state and arguments give byte-identical shards and indexes from one process, 2 DDP ranks,
2 FSDP2 ranks and 4 FSDP2 ranks (uneven and empty shards). Only the manifest, which records
who wrote what, may differ."""

from __future__ import annotations

import torch
from tests.dist.harness import run_ranks
from tests.dist.models import make_uneven

from ckptio import Booster
from ckptio.formats.naming import MANIFEST
from ckptio.plugins import TorchDDPPlugin, TorchFSDPPlugin

FORMATS = {
    "st": {"shard": True, "use_safetensors": True, "size_per_shard": 0.0003},
    "bin": {"shard": True, "use_safetensors": False, "size_per_shard": 0.0005},
    "one.safetensors": {},
}


def _known_value(name: str, shape) -> torch.Tensor:
    """A full tensor that depends only on its name and shape (the same on every rank and layout)."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(name))
    return torch.arange(int(torch.Size(shape).numel()), dtype=torch.float32).reshape(shape) * 0.001 + seed % 97


def _set_known_optimizer_state(model, optimizer) -> None:
    """Adam's state made equal everywhere: each rank fills its part of a known full tensor."""
    from torch.distributed.tensor import DTensor

    from ckptio.engine.tensors import local_region

    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for p, entries in optimizer.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                t = entries[key]
                full = _known_value(f"{names[id(p)]}/{key}", t.shape)
                if isinstance(t, DTensor):
                    t.to_local().copy_(full[local_region(t).index()])
                else:
                    t.copy_(full)
            entries["step"].fill_(3.0)


def _job(plugin_name: str, root) -> None:
    model = make_uneven(seed=0)
    if plugin_name == "one":
        booster = Booster()
    elif plugin_name == "ddp":
        booster = Booster(plugin=TorchDDPPlugin())
    else:
        booster = Booster(plugin=TorchFSDPPlugin(shard_classes={"Block"}))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer, *_ = booster.boost(model, optimizer)
    model(torch.arange(8).reshape(2, 4)).sum().backward()
    optimizer.step()
    _set_known_optimizer_state(model.module if plugin_name == "ddp" else model, optimizer)
    for fmt, kwargs in FORMATS.items():
        booster.save_model(model, root / f"model-{fmt}", **kwargs)
    booster.save_optimizer(optimizer, root / "optim", shard=True, size_per_shard=0.0002)


def _files(folder) -> dict[str, bytes]:
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != MANIFEST}


def test_one_process_and_2_or_4_ranks_write_the_same_bytes(tmp_path):
    jobs = {"one": 1, "ddp": 2, "fsdp": 2, "fsdp4": 4}
    roots = {name: tmp_path / name for name in jobs}

    def scenario(ctx):
        for name, world in jobs.items():
            ctx.phase(world, name, lambda name=name: _job(name.rstrip("4"), roots[name]))
        return True

    run_ranks(scenario, 4, tmp_path)
    saved = [f"model-{fmt}" for fmt in FORMATS] + ["optim"]
    for what in saved:
        reference = _files(roots["one"] / what)
        assert reference and any(len(b) > 1000 for b in reference.values()), what
        if what != "model-one.safetensors":
            assert len(reference) > 3, (what, list(reference))  # several shards + index
        for name in ("ddp", "fsdp", "fsdp4"):
            got = _files(roots[name] / what)
            assert list(got) == list(reference), (name, what)
            different = [f for f in reference if got[f] != reference[f]]
            assert not different, f"{name} wrote different bytes than one process in {what}: {different}"
