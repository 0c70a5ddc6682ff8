"""HybridParallelPlugin (tensor parallel x FSDP2 on a (dp, tp) mesh): training matches one
process; a checkpoint saved at (dp=2, tp=2) loads at (1, 2), (4, 1), (2, 1), in one process
and in ``transformers``; training continues after a cross-layout load as in one process.

One forked group of 4 processes runs every multi-rank phase (see tests/dist/harness.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys, full_optimizer_state, full_state
from tests.hybrid.models import make_optimizer, tiny_gpt2, tiny_llama, train_steps

from ckptio import Booster
from ckptio.formats.naming import MANIFEST
from ckptio.training import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.dist

SAVE_STEPS = range(0, 3)
MORE_STEPS = range(3, 5)
LOADS = ("1x2", "4x1", "2x1", "2x2")  # (dp, tp) layouts the (2, 2) checkpoint is loaded at


def _boxes_exact(model, optimizer) -> list[str]:
    """Names whose local part is not a box, or differs from its box of the full tensor:
    the IO writes and reads exactly these boxes, so they must be right for every layout."""
    from torch.distributed.tensor import DTensor

    from ckptio.engine.tensors import local_region

    bad = []
    tensors = dict(model.named_parameters())
    names = {id(p): n for n, p in tensors.items()}
    for p, entries in optimizer.state.items():
        tensors.update({f"{names[id(p)]}/{k}": v for k, v in entries.items() if isinstance(v, DTensor)})
    for name, t in tensors.items():
        if not isinstance(t, DTensor):
            continue
        region = local_region(t)
        full = t.full_tensor()
        if not region.box or not torch.equal(t.to_local(), full[region.index()]):
            bad.append(f"{name} {t.placements} {region}")
    return bad


def _job(make_model, tp: int, *, load=None, save=None, steps=range(0), seed: int = 0) -> dict:
    """Build, boost at (world // tp, tp), optionally load, train ``steps``, optionally save."""
    from ckptio.plugins import HybridParallelPlugin

    plugin = HybridParallelPlugin(tp_size=tp)
    model = make_model(seed)
    optimizer = make_optimizer(model)
    booster = Booster(plugin=plugin)
    model, optimizer, *_ = booster.boost(model, optimizer)
    out: dict = {"mesh": tuple(plugin.mesh.shape)}
    if load is not None:
        from ckptio.engine.reader import TensorFile

        whole_reads = []
        read_full = TensorFile.read
        TensorFile.read = lambda self, key: whole_reads.append(key) or read_full(self, key)
        try:
            report = booster.load_model(model, load / "model")
            assert report.ok, report.describe()
            booster.load_optimizer(optimizer, load / "optim")
        finally:
            TensorFile.read = read_full
        out["whole_reads"] = whole_reads  # tensors read whole instead of only this rank's box
        out["loaded"] = full_state(model)
        out["loaded_optim"] = full_optimizer_state(optimizer, model)
    dp_rank = plugin.mesh.get_local_rank("dp")
    dp_group = plugin.mesh["dp"].get_group()
    out["losses"] = train_steps(model, optimizer, steps, dp_rank=dp_rank, dp_size=plugin.dp_size, dp_group=dp_group)
    out["bad_boxes"] = _boxes_exact(model, optimizer)
    if save is not None:
        booster.save_model(model, save / "model", shard=True, use_safetensors=True, size_per_shard=0.002)
        booster.save_optimizer(optimizer, save / "optim", shard=True, size_per_shard=0.002)
        # async on a 2-D mesh: staged boxes written by the background threads (booster.wait() below)
        save_checkpoint(save / "train", booster, model, optimizer, None, 0, 3, 1, use_async=True)
        assert booster.checkpoint_io._background is not None, "the 2-D layout must take the background path"
        out["saved"] = full_state(model)
        out["saved_optim"] = full_optimizer_state(optimizer, model)
        booster.wait()
    return out


def _resume_job(tp: int, ck) -> dict:
    """``load_checkpoint`` of the training checkpoint saved at (2, 2), at (world // tp, tp)."""
    import warnings

    from ckptio.plugins import HybridParallelPlugin

    booster = Booster(plugin=HybridParallelPlugin(tp_size=tp))
    model = tiny_llama(9)
    model, optimizer, *_ = booster.boost(model, make_optimizer(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-rank RNG of 4 ranks cannot match 2: warned, expected
        position = load_checkpoint(ck / "train" / "epoch-0_step-3", booster, model, optimizer, None)
    return {"position": position, "loaded": full_state(model), "loaded_optim": full_optimizer_state(optimizer, model)}


def _layout_errors() -> list[str]:
    """Wrong sizes fail at construction with a message naming them (on 2 ranks)."""
    from ckptio.plugins import HybridParallelPlugin

    messages = []
    for kwargs in ({"tp_size": 3}, {"tp_size": 2, "dp_size": 2}, {"tp_size": 1, "pp_size": 3}):
        try:
            HybridParallelPlugin(**kwargs)
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def _single_process(make_model, ck=None, steps=range(0), seed: int = 0):
    """The reference: one process, plain model and AdamW, optionally loaded from ``ck``."""
    model = make_model(seed)
    optimizer = make_optimizer(model)
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    if ck is not None:
        assert booster.load_model(model, ck / "model").ok
        booster.load_optimizer(optimizer, ck / "optim")
    losses = train_steps(model, optimizer, steps)
    return model, optimizer, losses


def _same_optim(a, b) -> list[str]:
    (state_a, groups_a), (state_b, groups_b) = a, b
    bad = diff_keys(state_a, state_b)
    if groups_a != groups_b:
        bad.append(f"param_groups {groups_a} != {groups_b}")
    return bad


def test_hybrid_save_2x2_loads_everywhere(tmp_path):
    ck, gpt_ck = tmp_path / "llama-2x2", tmp_path / "gpt2-2x2"

    def scenario(ctx):
        out = {}
        out["save"] = ctx.phase(4, "save22", lambda: _job(tiny_llama, 2, save=ck, steps=SAVE_STEPS))
        out["errors"] = ctx.phase(2, "errors", _layout_errors)
        for name, world, tp in (("1x2", 2, 2), ("4x1", 4, 1), ("2x1", 2, 1), ("2x2", 4, 2)):
            job = ctx.phase(world, f"load{name}", lambda tp=tp: _job(tiny_llama, tp, load=ck, steps=MORE_STEPS, seed=9))
            if job is not None:
                out[name] = job
        out["resume"] = ctx.phase(2, "resume", lambda: _resume_job(2, ck))
        out["gpt2"] = ctx.phase(4, "gpt2", lambda: _job(tiny_gpt2, 2, save=gpt_ck, steps=SAVE_STEPS))
        return out

    results = run_ranks(scenario, 4, tmp_path, timeout=240)
    r0 = results[0]
    assert r0["save"]["mesh"] == (2, 2) and r0["1x2"]["mesh"] == (1, 2) and r0["4x1"]["mesh"] == (4, 1)
    for rank, res in enumerate(results):
        for name, job in res.items():
            if isinstance(job, dict) and "bad_boxes" in job:
                assert job["bad_boxes"] == [], (rank, name, job["bad_boxes"])

    # training under (2, 2) matches one process (fp32 tolerance: TP changes the reduction order)
    ref_model, ref_optim, ref_losses = _single_process(tiny_llama, steps=SAVE_STEPS)
    assert r0["save"]["losses"] == pytest.approx(ref_losses, rel=1e-5)
    saved, saved_optim = r0["save"]["saved"], r0["save"]["saved_optim"]
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=1e-4, atol=1e-5, msg=k)

    # every layout and the single process load exactly what was saved
    for name in LOADS:
        for rank in range(2 if name in ("1x2", "2x1") else 4):
            job = results[rank][name]
            assert diff_keys(job["loaded"], saved) == [], (name, rank)
            assert _same_optim(job["loaded_optim"], saved_optim) == [], (name, rank)
            if name != "1x2":  # every parameter is a DTensor: only boxes are read
                assert job["whole_reads"] == [], (name, rank, job["whole_reads"])
    for rank in (0, 1):  # the training checkpoint (save_checkpoint / load_checkpoint) moves layout too
        resumed = results[rank]["resume"]
        assert resumed["position"] == (0, 3, 3)
        assert diff_keys(resumed["loaded"], saved) == [] and _same_optim(resumed["loaded_optim"], saved_optim) == []
    plain, plain_optim, _ = _single_process(tiny_llama, ck, seed=9)
    assert diff_keys(plain.state_dict(), saved) == []
    assert _same_optim(full_optimizer_state(plain_optim, plain), saved_optim) == []

    # transformers reads the folder; logits equal the single-process load
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(ck / "model")
    ids = torch.arange(16).reshape(2, 8) % 50
    with torch.no_grad():
        assert torch.equal(hf(input_ids=ids).logits, plain(input_ids=ids).logits)

    # training continues after a cross-layout load like the single-process continuation
    _, _, ref_more = _single_process(tiny_llama, ck, steps=MORE_STEPS, seed=9)
    for name in LOADS:
        assert r0[name]["losses"] == pytest.approx(ref_more, rel=1e-5), name

    # the folder: files from several ranks, the layout recorded, no padding (exact shapes)
    manifest = json.loads((ck / "model" / MANIFEST).read_text())
    assert len(set(manifest["written_by_rank"].values())) > 1, manifest["written_by_rank"]
    assert manifest["layout"]["mesh_shape"] == {"dp": 2, "tp": 2}
    assert manifest["layout"]["plugin"] == "HybridParallelPlugin"
    assert manifest["layout"]["torch_version"] == torch.__version__
    optim_manifest = json.loads((ck / "optim" / MANIFEST).read_text())
    assert optim_manifest["layout"]["mesh_shape"] == {"dp": 2, "tp": 2}
    train_manifest = json.loads((ck / "train" / "epoch-0_step-3" / MANIFEST).read_text())
    assert train_manifest["layout"]["mesh_shape"] == {"dp": 2, "tp": 2}

    # wrong sizes: clear errors, raised before any mesh exists
    errors = results[0]["errors"]
    assert len(errors) == 3, errors
    assert "world size 2 is not divisible by tp_size=3" in errors[0]
    assert "!= world size 2" in errors[1] and "pp_size * tp_size = 3 * 1" in errors[2]

    # GPT-2 (Conv1D MLP sharded with the Conv1D styles) trains like one process and loads
    from transformers import GPT2LMHeadModel

    g_ref, _, g_losses = _single_process(tiny_gpt2, steps=SAVE_STEPS)
    assert r0["gpt2"]["losses"] == pytest.approx(g_losses, rel=1e-5)
    g_plain, g_plain_optim, _ = _single_process(tiny_gpt2, gpt_ck, seed=9)
    assert diff_keys(g_plain.state_dict(), r0["gpt2"]["saved"]) == []
    assert _same_optim(full_optimizer_state(g_plain_optim, g_plain), r0["gpt2"]["saved_optim"]) == []
    g_hf = GPT2LMHeadModel.from_pretrained(gpt_ck / "model")
    with torch.no_grad():
        assert torch.equal(g_hf(input_ids=ids).logits, g_plain(input_ids=ids).logits)
