"""Exact resume on 2 ranks with FSDP2: straight run == run + save_checkpoint + new processes
+ load_checkpoint + the rest, bit for bit (losses, weights, optimizer state)."""

from __future__ import annotations

import shutil

import pytest
import torch
from tests.dist.harness import run_ranks
from tests.dist.models import full_optimizer_state, full_state, make_optimizer, make_uneven

from ckptio import Booster, CheckpointManager
from ckptio.plugins import TorchDDPPlugin, TorchFSDPPlugin
from ckptio.training import load_checkpoint, save_checkpoint

STEPS, SPLIT, BATCH = 6, 3, 3


def _setup(plugin: str):
    rank = torch.distributed.get_rank()
    torch.manual_seed(100 + rank)  # per-rank data and dropout streams
    model = make_uneven(0)
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    plugin_obj = TorchFSDPPlugin(shard_classes={"Block"}) if plugin == "fsdp" else TorchDDPPlugin()
    booster = Booster(plugin=plugin_obj)
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    return booster, model, optimizer, scheduler


def _steps(model, optimizer, scheduler, start: int, stop: int) -> list[float]:
    losses = []
    for _ in range(start, stop):
        idx = torch.randint(0, 13, (BATCH, 4))  # global RNG: restored per rank on resume
        noise = torch.nn.functional.dropout(torch.ones(BATCH, 4, 5), 0.3)
        loss = (model(idx) * noise).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(loss.item())
    return losses


def _final(model, optimizer):
    return {"model": full_state(model), "optim": full_optimizer_state(optimizer, model)}


@pytest.mark.parametrize("plugin", ["fsdp", "ddp"])
def test_exact_resume_on_2_ranks(tmp_path, plugin):
    save_dir = tmp_path / "run"

    def straight(ctx):
        def fn():
            booster, model, optimizer, scheduler = _setup(plugin)
            losses = _steps(model, optimizer, scheduler, 0, STEPS)
            return losses, _final(model, optimizer)

        return ctx.phase(2, "straight", fn)

    def first_half(ctx):
        def fn():
            booster, model, optimizer, scheduler = _setup(plugin)
            losses = _steps(model, optimizer, scheduler, 0, SPLIT)
            save_checkpoint(save_dir, booster, model, optimizer, scheduler, 0, SPLIT, BATCH, size_per_shard=0.0003)
            return losses

        return ctx.phase(2, "first", fn)

    def second_half(ctx):
        def fn():
            booster, model, optimizer, scheduler = _setup(plugin)
            torch.manual_seed(12345)  # whatever the RNG was, load_checkpoint restores it
            epoch, step, start = load_checkpoint(
                save_dir / f"epoch-0_step-{SPLIT}", booster, model, optimizer, scheduler
            )
            assert (epoch, step, start) == (0, SPLIT, SPLIT * BATCH)
            losses = _steps(model, optimizer, scheduler, step, STEPS)
            return losses, _final(model, optimizer), scheduler.last_epoch

        return ctx.phase(2, "second", fn)

    ref = run_ranks(straight, 2, tmp_path)
    first = run_ranks(first_half, 2, tmp_path)
    second = run_ranks(second_half, 2, tmp_path)
    for rank in range(2):
        losses, final = ref[rank]
        assert first[rank] + second[rank][0] == losses
        assert second[rank][2] == STEPS
        for part in ("model",):
            assert final[part].keys() == second[rank][1][part].keys()
            assert all(torch.equal(final[part][k], second[rank][1][part][k]) for k in final[part])
        ostate, ogroups = final["optim"]
        rstate, rgroups = second[rank][1]["optim"]
        assert ogroups == rgroups and ostate.keys() == rstate.keys()
        assert all(torch.equal(ostate[k], rstate[k]) for k in ostate)


def test_resume_on_another_world_size_restores_all_and_warns_about_rng(tmp_path):
    import warnings

    save_dir = tmp_path / "run"
    ckpt = save_dir / f"epoch-0_step-{SPLIT}"

    def save():
        booster, model, optimizer, scheduler = _setup("fsdp")
        _steps(model, optimizer, scheduler, 0, SPLIT)
        save_checkpoint(save_dir, booster, model, optimizer, scheduler, 0, SPLIT, BATCH)
        return _final(model, optimizer), scheduler.state_dict()

    def load():
        booster, model, optimizer, scheduler = _setup("fsdp")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_checkpoint(ckpt, booster, model, optimizer, scheduler)
        return _final(model, optimizer), scheduler.state_dict(), [str(w.message) for w in caught]

    def scenario(ctx):
        return ctx.phase(2, "save", save), ctx.phase(3, "load", load)

    results = run_ranks(scenario, 3, tmp_path)
    (saved, saved_sched), _ = results[0]
    for rank in range(3):
        final, sched, messages = results[rank][1]
        assert sched == saved_sched
        assert all(torch.equal(final["model"][k], v) for k, v in saved["model"].items())
        assert final["optim"][1] == saved["optim"][1]
        assert all(torch.equal(final["optim"][0][k], v) for k, v in saved["optim"][0].items())
        assert any("saved on 2 ranks and is loaded on 3" in m and "ranks 2..2 have no saved RNG" in m for m in messages)

    # one plain process: restored, with the warning
    model = make_uneven(3)
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    booster = Booster()
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    with pytest.warns(UserWarning, match="RNG states of ranks 1..1 are not used"):
        load_checkpoint(ckpt, booster, model, optimizer, scheduler)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["model"].items())
    assert scheduler.state_dict() == saved_sched


@pytest.mark.parametrize("plugin", ["fsdp", "ddp"])
def test_checkpoint_manager_on_2_ranks_rotates_and_resumes_exactly(tmp_path, plugin):
    """CheckpointManager on every rank: only the master deletes, all ranks agree on what to
    resume from, and the resumed run continues bit-exactly; a crashed save's staging folder is
    cleared and never chosen."""
    save_dir = tmp_path / "run"

    def train_and_save():
        booster, model, optimizer, scheduler = _setup(plugin)
        manager = CheckpointManager(save_dir, booster, keep_last=2, save_every=2)
        for step in range(1, STEPS + 1):
            _steps(model, optimizer, scheduler, step - 1, step)
            manager.save(model, optimizer, scheduler, 0, step, BATCH, size_per_shard=0.0003)
            if step == 4:
                at_four = _final(model, optimizer)
        kept = [p.name for p in manager.checkpoints()]
        losses = _steps(model, optimizer, scheduler, STEPS, STEPS + 2)
        return kept, at_four, losses

    def resume():
        if torch.distributed.get_rank() == 0:  # debris of a save that crashed, newer than any real one
            (save_dir / ".epoch-9_step-99.ckptio-tmp-0123456789ab").mkdir()
        torch.distributed.barrier()
        booster, model, optimizer, scheduler = _setup(plugin)
        manager = CheckpointManager(save_dir, booster)
        # drop the newest (step 6) so the resume lands on step 4, whose state we kept
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(save_dir / f"epoch-0_step-{STEPS}")
        torch.distributed.barrier()
        where = manager.resume(model, optimizer, scheduler)
        state = _final(model, optimizer)
        losses = _steps(model, optimizer, scheduler, 4, STEPS + 2)
        return where, state, losses, sorted(p.name for p in save_dir.iterdir())

    def scenario(ctx):
        return ctx.phase(2, "train", train_and_save), ctx.phase(2, "resume", resume)

    results = run_ranks(scenario, 2, tmp_path)
    for rank in range(2):
        (kept, at_four, straight_losses), (where, state, losses, names) = results[rank]
        assert kept == ["epoch-0_step-4", "epoch-0_step-6"]
        assert where == (0, 4, 4 * BATCH)
        assert names == ["epoch-0_step-4"], "the crashed save's staging folder is removed"
        assert all(torch.equal(state["model"][k], v) for k, v in at_four["model"].items())
        assert all(torch.equal(state["optim"][0][k], v) for k, v in at_four["optim"][0].items())
        assert losses[-2:] == straight_losses  # the same last two steps after resuming at 4


def test_checkpoint_manager_on_2_ranks_skips_a_corrupt_newest_on_every_rank(tmp_path):
    """A bit flip in the newest checkpoint (same size: only a checksum tells) is found by one
    collective check, so both ranks fall back to the same older checkpoint."""
    save_dir = tmp_path / "run"

    def save():
        booster, model, optimizer, scheduler = _setup("ddp")
        manager = CheckpointManager(save_dir, booster, keep_last=None)
        states = {}
        for step in (2, 4):
            _steps(model, optimizer, scheduler, step - 2, step)
            manager.save(model, optimizer, scheduler, 0, step, BATCH)
            states[step] = _final(model, optimizer)
        return states

    def resume():
        if torch.distributed.get_rank() == 0:
            shard = next((save_dir / "epoch-0_step-4" / "modeling").glob("*.safetensors"))
            data = bytearray(shard.read_bytes())
            data[-1] ^= 0x01
            shard.write_bytes(bytes(data))
        torch.distributed.barrier()
        booster, model, optimizer, scheduler = _setup("ddp")
        manager = CheckpointManager(save_dir, booster)
        with pytest.warns(UserWarning, match="skipping incomplete or damaged checkpoint .*epoch-0_step-4"):
            where = manager.resume(model, optimizer, scheduler, verify=True)
        return where, _final(model, optimizer)

    def scenario(ctx):
        return ctx.phase(2, "save", save), ctx.phase(2, "resume", resume)

    results = run_ranks(scenario, 2, tmp_path)
    for rank in range(2):
        states, (where, state) = results[rank]
        assert where == (0, 2, 2 * BATCH)
        assert all(torch.equal(state["model"][k], v) for k, v in states[2]["model"].items())
        assert all(torch.equal(state["optim"][0][k], v) for k, v in states[2]["optim"][0].items())


def _flip_rng_format(rng_file) -> None:
    """Same size, so only a checksum would notice: the file is no longer an RNG state."""
    text = rng_file.read_text()
    rng_file.write_text(text.replace('"ckptio-rng"', '"ckptio-rnX"'))


def _outcome(call):
    """(result, None) or (None, (error type, message)): the test compares what every rank saw."""
    try:
        return call(), None
    except Exception as exc:  # noqa: BLE001 (judged by the test)
        return None, (type(exc).__name__, str(exc))


def _everything(model, optimizer, scheduler):
    import random

    return {
        **_final(model, optimizer),
        "scheduler": scheduler.state_dict(),
        "rng": (random.getstate(), torch.get_rng_state()),
    }


def _unchanged(before, after) -> bool:
    (m0, (s0, g0)), (m1, (s1, g1)) = (before["model"], before["optim"]), (after["model"], after["optim"])
    return (
        m0.keys() == m1.keys()
        and all(torch.equal(m0[k], m1[k]) for k in m0)
        and g0 == g1
        and s0.keys() == s1.keys()
        and all(torch.equal(s0[k], s1[k]) for k in s0)
        and before["scheduler"] == after["scheduler"]
        and before["rng"][0] == after["rng"][0]
        and torch.equal(before["rng"][1], after["rng"][1])
    )


@pytest.mark.parametrize("plugin", ["ddp", "fsdp"])
def test_a_load_refused_on_one_rank_is_refused_on_every_rank_and_changes_nothing(tmp_path, plugin):
    """Rank 1's RNG file is damaged (same size): both ranks raise the same error, and neither
    rank's model, optimizer, scheduler or RNG was touched (rank 0's own parts were all fine, and
    its checks of them ran no collective that rank 1 would never join)."""
    save_dir = tmp_path / "run"

    def save():
        booster, model, optimizer, scheduler = _setup(plugin)
        _steps(model, optimizer, scheduler, 0, 2)
        save_checkpoint(save_dir, booster, model, optimizer, scheduler, 0, 2, BATCH)

    def load():
        if torch.distributed.get_rank() == 1:
            _flip_rng_format(save_dir / "epoch-0_step-2" / "rng_state" / "rank_00001.json")
        torch.distributed.barrier()
        booster, model, optimizer, scheduler = _setup(plugin)
        _steps(model, optimizer, scheduler, 0, 1)  # live state of its own
        before = _everything(model, optimizer, scheduler)
        _, error = _outcome(lambda: load_checkpoint(save_dir / "epoch-0_step-2", booster, model, optimizer, scheduler))
        return error, _unchanged(before, _everything(model, optimizer, scheduler))

    def scenario(ctx):
        ctx.phase(2, "save", save)
        return ctx.phase(2, "load", load)

    results = run_ranks(scenario, 2, tmp_path)
    assert results[0][0] is not None and results[0][0] == results[1][0], results
    name, message = results[0][0]
    assert name == "CheckpointFormatError" and "rank 1" in message and "rank_00001.json" in message, message
    assert results[0][1] and results[1][1], "no rank may have loaded anything"


def test_checkpoint_manager_on_2_ranks_agrees_on_damage_mismatch_and_whose_folder_it_is(tmp_path):
    """Damage seen by one rank only is skipped by both; a checkpoint that does not fit raises the same
    StateMismatchError on both; a fresh run refuses, on both, to overwrite the folder's checkpoints."""
    save_dir = tmp_path / "run"

    def save():
        booster, model, optimizer, scheduler = _setup("ddp")
        manager = CheckpointManager(save_dir, booster, keep_last=None)
        states = {}
        for step in (2, 4):
            _steps(model, optimizer, scheduler, step - 2, step)
            manager.save(model, optimizer, scheduler, 0, step, BATCH)
            states[step] = _final(model, optimizer)
        return states

    def resume_past_damage():
        if torch.distributed.get_rank() == 1:
            _flip_rng_format(save_dir / "epoch-0_step-4" / "rng_state" / "rank_00001.json")
        torch.distributed.barrier()
        booster, model, optimizer, scheduler = _setup("ddp")
        where, error = _outcome(lambda: CheckpointManager(save_dir, booster).resume(model, optimizer, scheduler))
        return where, error, _final(model, optimizer)

    def resume_into_another_model():
        booster, model, optimizer, scheduler = _setup_other_head()
        before = _everything(model, optimizer, scheduler)
        _, error = _outcome(lambda: CheckpointManager(save_dir, booster).resume(model, optimizer, scheduler))
        return error, _unchanged(before, _everything(model, optimizer, scheduler))

    def fresh_run():
        booster, model, optimizer, scheduler = _setup("ddp")
        manager = CheckpointManager(save_dir, booster, keep_last=1)
        _, error = _outcome(lambda: manager.save(model, optimizer, scheduler, 0, 1, BATCH))
        return error, sorted(p.name for p in save_dir.iterdir())

    def scenario(ctx):
        return (
            ctx.phase(2, "save", save),
            ctx.phase(2, "damage", resume_past_damage),
            ctx.phase(2, "mismatch", resume_into_another_model),
            ctx.phase(2, "fresh", fresh_run),
        )

    results = run_ranks(scenario, 2, tmp_path)
    for rank in range(2):
        states, (where, error, state), (mismatch, unchanged), (refused, names) = results[rank]
        assert error is None and where == (0, 2, 2 * BATCH), (where, error)
        assert all(torch.equal(state["model"][k], v) for k, v in states[2]["model"].items())
        assert mismatch == results[0][2][0] and mismatch[0] == "StateMismatchError", mismatch
        assert "epoch-0_step-4" in mismatch[1] and "head.weight" in mismatch[1], mismatch
        assert unchanged
        assert refused == results[0][3][0] and refused[0] == "CheckpointExistsError", refused
        assert "epoch-0_step-2" in refused[1] and "discard_existing=True" in refused[1], refused
        assert names == ["epoch-0_step-2", "epoch-0_step-4"]


def _setup_other_head():
    """The job after a config change: a head with 7 outputs instead of 5."""
    rank = torch.distributed.get_rank()
    torch.manual_seed(100 + rank)
    model = make_uneven(0)
    model.head = torch.nn.Linear(6, 7)
    model.register_buffer("scale", torch.linspace(0.5, 1.5, 7))
    optimizer = make_optimizer(model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    booster = Booster(plugin=TorchDDPPlugin())
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    return booster, model, optimizer, scheduler
