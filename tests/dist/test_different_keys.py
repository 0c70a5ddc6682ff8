"""Ranks holding different keys (pipeline stages, expert shards): one Hugging Face folder that
does not depend on how the keys were spread, loadable at any other split and in one process.

The stages here are cut by hand (no schedule): each rank keeps some of a model's tensors under
their full names, so the engine is tested apart from the pipeline plugin
(tests/hybrid/test_hybrid_pipeline.py).
"""

from __future__ import annotations

import pytest
import torch
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys, full_optimizer_state, make_uneven

from ckptio import Booster
from ckptio.errors import StateMismatchError

pytestmark = pytest.mark.dist

# which tensors each rank keeps, by split: "2": two stages; "2b": another cut of the same model.
# Stages hold the model's tensors in its state order (the root's buffer ``scale`` comes first), so
# the union, taken in rank order, is the model's own order.
SPLITS = {
    "2": (("scale", "emb.", "blocks.0."), ("blocks.1.", "head.")),
    "2b": (("emb.",), ("scale", "blocks.", "head.")),
    "1": (("",),),
}


def keep_only(model: torch.nn.Module, prefixes: tuple[str, ...]) -> torch.nn.Module:
    """Drop every parameter and buffer whose name starts with none of ``prefixes``; the rest keep
    their full names (what a pipeline stage holds)."""
    for name, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for local in list(table):
                full = f"{name}.{local}" if name else local
                if not full.startswith(prefixes):
                    del table[local]
    return model


def _optimizer(model):
    params = dict(model.named_parameters())
    first = [p for n, p in params.items() if n.startswith("emb.")]
    return torch.optim.AdamW(
        [{"params": first, "lr": 0.01}, {"params": [p for n, p in params.items() if not n.startswith("emb.")]}],
        lr=0.003,
        weight_decay=0.2,
    )


def _stage(split: str, rank: int, seed: int = 0):
    model = keep_only(make_uneven() if seed == 0 else _reseeded(seed), SPLITS[split][rank])
    return model, _optimizer(model)


def _reseeded(seed: int):
    model = make_uneven()
    with torch.no_grad():
        for i, t in enumerate(model.state_dict().values()):
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(seed + i)))
    return model


def _step(model, optimizer) -> None:
    loss = sum((p.float() ** 2).sum() for p in model.parameters())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _io():
    from ckptio.checkpoint_io.distributed import DistributedCheckpointIO
    from ckptio.state.optimizer import register_model

    return DistributedCheckpointIO(keys_differ=True), register_model


def _save(split: str, ck) -> dict:
    import torch.distributed as dist

    io, register = _io()
    model, optimizer = _stage(split, dist.get_rank())
    register(optimizer, model)
    _step(model, optimizer)
    io.save_model(model, ck / "model", shard=True, use_safetensors=True, size_per_shard=0.0003)
    io.save_optimizer(optimizer, ck / "optim", shard=True, size_per_shard=0.0003)
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "optim": full_optimizer_state(optimizer, model),
    }


def _load(split: str, ck) -> dict:
    import torch.distributed as dist

    io, register = _io()
    model, optimizer = _stage(split, dist.get_rank(), seed=7)
    register(optimizer, model)
    _step(model, optimizer)  # state to overwrite
    io.load_model(model, ck / "model")
    report = io.last_load_report
    io.load_optimizer(optimizer, ck / "optim")
    return {"report": report, "state": dict(model.state_dict()), "optim": full_optimizer_state(optimizer, model)}


def _strict_errors(ck) -> list[str]:
    """A key this rank's model holds that the checkpoint lacks, and checkpoint keys no rank holds."""
    import torch.distributed as dist

    io, _ = _io()
    out = []
    model = keep_only(make_uneven(), SPLITS["2"][dist.get_rank()])
    model.register_buffer("extra", torch.zeros(2)) if dist.get_rank() == 1 else None
    for split_model in (model, keep_only(make_uneven(), ("emb.",))):
        try:
            io.load_model(split_model, ck / "model")
            out.append("loaded")
        except StateMismatchError as exc:
            out.append(str(exc))
    io.load_model(keep_only(make_uneven(), ("emb.",)), ck / "model", strict=False)
    out.append(sorted(io.last_load_report.unexpected_keys))
    return out


def test_stages_save_one_folder_loading_at_any_split(tmp_path):
    ck = tmp_path / "stages"

    def scenario(ctx):
        return {
            "saved": ctx.phase(2, "save", lambda: _save("2", ck)),
            "other": ctx.phase(2, "load2b", lambda: _load("2b", ck)),
            "strict": ctx.phase(2, "strict", lambda: _strict_errors(ck)),
        }

    results = run_ranks(scenario, 2, tmp_path)
    saved = {k: v for r in results for k, v in r["saved"]["state"].items()}
    saved_optim = {k: v for r in results for k, v in r["saved"]["optim"][0].items()}
    assert set(saved) == set(make_uneven().state_dict())

    # one process: the plain model and optimizer load the union of the stages
    model = make_uneven()
    optimizer = _optimizer(model)
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    _step(model, optimizer)
    report = booster.load_model(model, ck / "model")
    assert report.ok, report.describe()
    assert diff_keys(model.state_dict(), saved) == []
    booster.load_optimizer(optimizer, ck / "optim")
    assert diff_keys(full_optimizer_state(optimizer, model)[0], saved_optim) == []

    # the same bytes as one process saving the whole model
    booster.save_model(model, tmp_path / "one" / "model", shard=True, use_safetensors=True, size_per_shard=0.0003)
    names = sorted(p.name for p in (ck / "model").iterdir() if p.suffix in (".safetensors", ".json"))
    one = sorted(p.name for p in (tmp_path / "one" / "model").iterdir() if p.suffix in (".safetensors", ".json"))
    assert names == one
    for name in names:
        if name.endswith(".safetensors") or name.endswith("index.json"):
            assert (ck / "model" / name).read_bytes() == (tmp_path / "one" / "model" / name).read_bytes(), name
    assert len([n for n in names if n.endswith(".safetensors")]) > 2

    # another split loads exactly its keys, model and optimizer
    for rank in (0, 1):
        other = results[rank]["other"]
        assert other["report"].ok, other["report"].describe()
        assert diff_keys(other["state"], {k: saved[k] for k in other["state"]}) == []
        assert set(other["state"]) == {k for k in saved if k.startswith(SPLITS["2b"][rank])}
        assert diff_keys(other["optim"][0], {k: saved_optim[k] for k in other["optim"][0]}) == []
        assert other["optim"][0] and set(other["optim"][0]) <= set(saved_optim)

    # strict loads: a key the checkpoint lacks is missing; keys that no rank holds are unexpected
    for rank in (0, 1):
        missing, unexpected, relaxed = results[rank]["strict"]
        assert "missing" in missing and "extra" in missing, missing
        assert "unexpected" in unexpected and "head.weight" in unexpected and "emb.weight" not in unexpected
        assert "head.weight" in relaxed and "emb.weight" not in relaxed
