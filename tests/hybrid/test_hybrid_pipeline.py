"""HybridParallelPlugin(pp_size=2): pipeline stages (torch.distributed.pipelining) x tensor
parallel x FSDP2. Training at (pp=2, dp=1, tp=2) and (pp=2, dp=2, tp=1) matches one process;
each checkpoint is one Hugging Face folder that loads at another layout, in one process and in
``transformers``, exactly.

One forked group of 4 processes runs every multi-rank phase (see tests/dist/harness.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys, full_optimizer_state, full_state
from tests.hybrid.models import causal_lm_loss, global_batch, make_optimizer, pipeline_llama

from ckptio import Booster
from ckptio.formats.naming import MANIFEST

pytestmark = pytest.mark.dist

STEPS = range(2)
LAYOUTS = {"pp2tp2": {"pp_size": 2, "tp_size": 2}, "pp2dp2": {"pp_size": 2, "tp_size": 1}}


def _train(layout: dict, ck, steps=STEPS) -> dict:
    from ckptio.plugins import HybridParallelPlugin

    plugin = HybridParallelPlugin(**layout, num_microbatches=2)
    model = pipeline_llama()
    booster = Booster(plugin=plugin)
    model, optimizer, *_ = booster.boost(model, make_optimizer(model))
    dp_rank, dp = plugin.mesh.get_local_rank("dp"), plugin.dp_size
    losses = []
    for step in steps:
        ids = global_batch(step)[dp_rank * 4 // dp : (dp_rank + 1) * 4 // dp]
        out = booster.execute_pipeline(iter([{"input_ids": ids, "labels": ids}]), model, causal_lm_loss, optimizer)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(None if out["loss"] is None else out["loss"].item())
    booster.save_model(model, ck / "model", shard=True, use_safetensors=True, size_per_shard=0.005)
    booster.save_optimizer(optimizer, ck / "optim", shard=True, size_per_shard=0.005)
    return {
        "losses": losses,
        "stage": plugin.stage,
        "dp_rank": dp_rank,
        "saved": full_state(model),
        "saved_optim": full_optimizer_state(optimizer, model)[0],
    }


def _load(layout: dict, ck) -> dict:
    """Load ``ck`` at another layout (the model of another seed, stepped once so its optimizer
    has state to overwrite), then report the full state this rank holds."""
    from ckptio.plugins import HybridParallelPlugin

    plugin = HybridParallelPlugin(**layout)
    model = pipeline_llama(seed=5)
    booster = Booster(plugin=plugin)
    model, optimizer, *_ = booster.boost(model, make_optimizer(model))
    report = booster.load_model(model, ck / "model")
    booster.load_optimizer(optimizer, ck / "optim")
    return {"report": report, "loaded": full_state(model), "optim": full_optimizer_state(optimizer, model)[0]}


def _reference() -> tuple[torch.nn.Module, list[float]]:
    model = pipeline_llama()
    optimizer = make_optimizer(model)
    losses = []
    for step in STEPS:
        ids = global_batch(step)
        loss = causal_lm_loss(model(input_ids=ids).logits, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, losses


def _union(results, key: str) -> dict:
    out: dict = {}
    for res in results:
        for k, v in res[key].items():
            assert k not in out or torch.equal(out[k], v), k  # ranks holding a key agree on it
            out[k] = v
    return out


def test_pipeline_stages_train_save_and_load_anywhere(tmp_path):
    cks = {name: tmp_path / name for name in LAYOUTS}

    def scenario(ctx):
        out = {
            name: ctx.phase(4, name, lambda layout=layout, ck=cks[name]: _train(layout, ck))
            for name, layout in LAYOUTS.items()
        }
        # (pp=2, tp=2) -> (pp=1, tp=2) on 2 ranks; (pp=2, dp=2) -> (pp=2, tp=2): stages cut from another mesh
        out["load_tp2"] = ctx.phase(2, "load_tp2", lambda: _load({"tp_size": 2}, cks["pp2tp2"]))
        out["load_pp2tp2"] = ctx.phase(4, "load_pp2tp2", lambda: _load(LAYOUTS["pp2tp2"], cks["pp2dp2"]))
        return out

    results = run_ranks(scenario, 4, tmp_path, timeout=240)
    ref, ref_losses = _reference()
    for name in LAYOUTS:
        jobs = [r[name] for r in results]
        saved = _union(jobs, "saved")
        assert set(saved) == set(ref.state_dict())
        # pipeline training matches one process. fp32 tolerance: TP and micro-batches reorder sums
        # (gradients agree to 1e-6 relative), and AdamW's normalised step turns that noise in the
        # smallest gradients into parameter differences of a few 1e-5
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(saved[k], v, rtol=1e-4, atol=1e-4, msg=f"{name} {k}")
        last = [j for j in jobs if j["stage"] == 1]
        for step, expected in enumerate(ref_losses):
            per_replica = {j["dp_rank"]: j["losses"][step] for j in last}  # each dp replica's half of the batch
            assert sum(per_replica.values()) / len(per_replica) == pytest.approx(expected, rel=1e-5), (name, step)
        assert all(j["losses"] == [None, None] for j in jobs if j["stage"] == 0)

        # one process, plain model and optimizer: exactly what the stages held
        model = pipeline_llama(seed=5)
        optimizer = make_optimizer(model)
        booster = Booster()
        model, optimizer, *_ = booster.boost(model, optimizer)
        report = booster.load_model(model, cks[name] / "model")
        assert report.ok, report.describe()
        assert diff_keys(model.state_dict(), saved) == [], name
        booster.load_optimizer(optimizer, cks[name] / "optim")
        assert diff_keys(full_optimizer_state(optimizer, model)[0], _union(jobs, "saved_optim")) == [], name

        # transformers reads the folder: the same tensors, the same logits
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(cks[name] / "model")
        assert diff_keys(hf.state_dict(), saved) == [], name
        ids = global_batch(7)
        with torch.no_grad():
            assert torch.equal(hf(input_ids=ids).logits, model(input_ids=ids).logits)

        # one folder, the layout recorded, written by both stages
        manifest = json.loads((cks[name] / "model" / MANIFEST).read_text())
        assert manifest["layout"]["mesh_shape"] == {
            "pp": 2,
            "dp": 2 if name == "pp2dp2" else 1,
            "tp": LAYOUTS[name]["tp_size"],
        }
        assert len(set(manifest["written_by_rank"].values())) > 1

    # loads at another layout: each rank holds exactly its keys of the saved state, model and optimizer
    for name, source in (("load_tp2", "pp2tp2"), ("load_pp2tp2", "pp2dp2")):
        saved = _union([r[source] for r in results], "saved")
        saved_optim = _union([r[source] for r in results], "saved_optim")
        loads = [r[name] for r in results if r[name] is not None]
        for job in loads:
            assert job["report"].ok, job["report"].describe()
            assert diff_keys(job["loaded"], {k: saved[k] for k in job["loaded"]}) == [], name
            assert diff_keys(job["optim"], {k: saved_optim[k] for k in job["optim"]}) == [], name
        assert set(_union(loads, "loaded")) == set(saved), name
        assert set(_union(loads, "optim")) == set(saved_optim), name
    assert len(results[0]["load_pp2tp2"]["loaded"]) < len(results[0]["load_tp2"]["loaded"])  # a stage's keys
