"""Checkpoints written by ``torch.distributed.checkpoint.save`` (DCP) from 1 and 2 ranks (FSDP2 state
dicts from ``get_state_dict``) load bit-exact at 1 and 2 ranks, model and optimizer, each rank reading
only its part of the data files; and convert into a Hugging Face folder."""

from __future__ import annotations

import torch
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys, full_optimizer_state, full_state, make_optimizer, make_uneven, train

from ckptio import Booster
from ckptio.engine import reader as reader_module
from ckptio.plugins import TorchFSDPPlugin
from ckptio.tools import convert_checkpoint


def _fsdp(seed: int):
    model = make_uneven(seed)
    optimizer = make_optimizer(model)
    booster = Booster(plugin=TorchFSDPPlugin(shard_classes={"Block"}))
    model, optimizer, *_ = booster.boost(model, optimizer)
    return booster, model, optimizer


def _save(folder, ref_path, ranks: int) -> None:
    """Train, then save as a DCP user does: ``get_state_dict`` (nested optimizer) and its flat form."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if ranks > 1:
        _, model, optimizer = _fsdp(0)
    else:
        model = make_uneven(0)
        optimizer = make_optimizer(model)
    train(model, optimizer, 3, torch.distributed.get_rank())
    for flat in (False, True):
        options = StateDictOptions(flatten_optimizer_state_dict=flat)
        msd, osd = get_state_dict(model, optimizer, options=options)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder / ("flat" if flat else "nested"))
    reference = {"model": full_state(model), "optim": full_optimizer_state(optimizer, model)}
    if torch.distributed.get_rank() == 0:
        torch.save(reference, ref_path)


def _compare(model, optimizer, ref_path) -> list[str]:
    ref = torch.load(ref_path, weights_only=True)
    state, groups = full_optimizer_state(optimizer, model)
    bad = diff_keys(full_state(model), ref["model"]) + diff_keys(state, ref["optim"][0])
    if groups != ref["optim"][1]:
        bad.append(f"param groups {groups} != {ref['optim'][1]}")
    return bad


def _load(folder, ref_path) -> tuple[list[str], int]:
    """Load into a fresh FSDP2 model and optimizer; also returns the data bytes this rank read."""
    booster, model, optimizer = _fsdp(5)
    read = []
    real = reader_module._pread_exact
    reader_module._pread_exact = lambda fd, view, off, p: (read.append(len(view)), real(fd, view, off, p))
    try:
        assert booster.load_model(model, folder).ok
    finally:
        reader_module._pread_exact = real
    booster.load_optimizer(optimizer, folder)
    bad = _compare(model, optimizer, ref_path)
    train(model, optimizer, 1, torch.distributed.get_rank(), start=3)  # the loaded DTensor state is usable
    return bad, sum(read)


def test_dcp_checkpoints_of_fsdp2_load_at_1_and_2_ranks(tmp_path):
    saves = {2: tmp_path / "saved2", 1: tmp_path / "saved1"}
    refs = {ranks: tmp_path / f"ref{ranks}.pt" for ranks in saves}
    loads = [(2, "nested"), (2, "flat"), (1, "nested")]  # (saved at, form), each loaded at 2 ranks

    def scenario(ctx):
        out = {}
        for ranks in saves:
            ctx.phase(ranks, f"save{ranks}", lambda r=ranks: _save(saves[r], refs[r], r))
        for ranks, form in loads:
            got = ctx.phase(2, f"load{ranks}-{form}", lambda r=ranks, f=form: _load(saves[r] / f, refs[r]))
            out[f"{ranks}->2 {form}"] = got
        return out

    results = run_ranks(scenario, 2, tmp_path)
    assert set(results[0]) == {"2->2 nested", "2->2 flat", "1->2 nested"}
    assert all(bad == [] for out in results for bad, _ in out.values()), results
    model_bytes = sum(t.numel() * t.element_size() for t in make_uneven(0).state_dict().values())
    for name in results[0]:
        per_rank = [out[name][1] for out in results]
        # each rank read its own rows of the sharded tensors (plus the small replicated buffer), not all
        assert all(0 < n < 0.7 * model_bytes for n in per_rank), (name, per_rank, model_bytes)

    # one plain process reads the 2-rank checkpoints, both optimizer forms
    for form in ("nested", "flat"):
        model = make_uneven(7)
        optimizer = make_optimizer(model)
        booster = Booster()
        model, optimizer, *_ = booster.boost(model, optimizer)
        assert booster.load_model(model, saves[2] / form).ok
        booster.load_optimizer(optimizer, saves[2] / form)
        assert _compare(model, optimizer, refs[2]) == [], form

    # and the 2-rank checkpoint converts into a Hugging Face folder holding the same tensors
    convert_checkpoint(saves[2] / "nested", tmp_path / "hf", size_per_shard=0.001)
    fresh = make_uneven(9)
    assert Booster().load_model(fresh, tmp_path / "hf").ok
    assert diff_keys(fresh.state_dict(), torch.load(refs[2], weights_only=True)["model"]) == []
