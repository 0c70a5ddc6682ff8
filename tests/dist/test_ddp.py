"""TorchDDPPlugin: parallel sharded saves at 2 and 4 ranks, loads at 1, 2 and 3 ranks."""

from __future__ import annotations

import json

import torch
from tests.dist.harness import run_ranks
from tests.helpers import MLPWithBuffers, randomize

from ckptio import Booster
from ckptio.formats.naming import MANIFEST
from ckptio.plugins import TorchDDPPlugin


def _reference(seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return randomize(MLPWithBuffers(), seed=seed).state_dict()


def _save(path, fmt: dict) -> dict:
    torch.manual_seed(0)
    model = randomize(MLPWithBuffers(), seed=3)
    booster = Booster(plugin=TorchDDPPlugin())
    model, *_ = booster.boost(model)
    booster.save_model(model, path, **fmt)
    return {"ok": True}


def _load_and_compare(path) -> list[str]:
    torch.manual_seed(0)
    model = randomize(MLPWithBuffers(), seed=99)
    booster = Booster(plugin=TorchDDPPlugin())
    model, *_ = booster.boost(model)
    report = booster.load_model(model, path)
    assert report.ok, report.describe()
    got = model.module.state_dict()
    return [k for k, v in _reference().items() if not torch.equal(got[k], v)]


def test_ddp_sharded_save_at_4_and_2_loads_at_1_2_3(tmp_path):
    ck = {4: tmp_path / "ddp4", 2: tmp_path / "ddp2"}
    fmts = {4: {"shard": True, "use_safetensors": True, "size_per_shard": 0.001}, 2: {"shard": True, "size_per_shard": 0.001}}

    def scenario(ctx):
        out = {}
        for ws in (4, 2):
            ctx.phase(ws, f"save{ws}", lambda ws=ws: _save(ck[ws], fmts[ws]))
        for ws_saved in (4, 2):
            for ws in (1, 2, 3):
                bad = ctx.phase(ws, f"load{ws_saved}-{ws}", lambda s=ws_saved: _load_and_compare(ck[s]))
                if bad is not None:
                    out[(ws_saved, ws)] = bad
        return out

    results = run_ranks(scenario, 4, tmp_path)
    for rank, out in enumerate(results):
        expected = {(s, w) for s in (4, 2) for w in (1, 2, 3) if rank < w}
        assert set(out) == expected
        assert all(bad == [] for bad in out.values()), out

    for ws in (4, 2):
        manifest = json.loads((ck[ws] / MANIFEST).read_text())
        writers = manifest["written_by_rank"]
        assert manifest["world_size"] == ws
        assert len(set(writers.values())) == ws, writers  # every rank wrote a part
        assert set(writers) == {n for n in manifest["files"] if n.startswith(("model-", "pytorch_model-"))}
    # and a plain single process (no process group) reads the folder too
    plain = randomize(MLPWithBuffers(), seed=7)
    Booster().load_model(plain, ck[4])
    for k, v in _reference().items():
        assert torch.equal(plain.state_dict()[k], v), k
    assert (ck[4] / "model.safetensors.index.json").is_file()
    assert (ck[2] / "pytorch_model.bin.index.json").is_file()


def test_ddp_single_file_written_by_master(tmp_path):
    target = tmp_path / "one.safetensors"

    def scenario(ctx):
        ctx.phase(2, "save", lambda: _save(target, {"shard": False}))
        return ctx.phase(2, "load", lambda: _load_and_compare(target))

    assert run_ranks(scenario, 2, tmp_path) == [[], []]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("ranks-")) == ["one.safetensors"]
