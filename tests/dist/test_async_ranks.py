"""Async saves on 2 ranks: the call returns while the files are still being written, training
(with its own collectives on the default group) goes on meanwhile, and what lands on disk is
the state at the moment of the call; a background failure on one rank is raised by
``booster.wait()`` on every rank and leaves the previous checkpoint as it was."""

from __future__ import annotations

import time

import pytest
import torch
from tests.dist.faults import fail_writes, wrap_writes
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys, full_optimizer_state, full_state, make_optimizer, make_uneven, train

from ckptio import Booster, DistributedCheckpointError
from ckptio.plugins import TorchDDPPlugin, TorchFSDPPlugin
from ckptio.training import load_checkpoint, save_checkpoint


def _boosted(plugin: str, seed: int = 0):
    model = make_uneven(seed)
    optimizer = make_optimizer(model)
    booster = Booster(plugin=TorchFSDPPlugin(shard_classes={"Block"}) if plugin == "fsdp" else TorchDDPPlugin())
    model, optimizer, *_ = booster.boost(model, optimizer)
    return booster, model, optimizer


def _plain_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}  # DDP's wrapper prefix


def _slow_writes(seconds: float) -> None:
    """Every file written by a save takes ``seconds`` longer: the save is surely still running when the call returns."""
    wrap_writes(before=lambda: time.sleep(seconds))


def _slow_copies(seconds: float) -> None:
    """Every tensor's background copy takes ``seconds`` longer: training surely meets a copy in progress."""
    from ckptio.async_io import staging

    original = staging._copy

    def slow(dest, src, stream):
        time.sleep(seconds)
        return original(dest, src, stream)

    staging._copy = slow


@pytest.mark.parametrize("plugin", ["fsdp", "ddp"])
def test_async_save_on_2_ranks_is_the_state_at_call_time(tmp_path, plugin):
    folder = tmp_path / "ck"

    def save():
        rank = torch.distributed.get_rank()
        booster, model, optimizer = _boosted(plugin)
        train(model, optimizer, 2, rank)
        expected = _plain_names(full_state(model))
        _slow_writes(0.3)
        _slow_copies(0.01)
        handle = booster.save_model(
            model, folder / "model", shard=True, use_safetensors=True, size_per_shard=0.0002, use_async=True
        )
        in_flight_after_call = booster.checkpoint_io.async_saver.in_flight and not handle.staged.done()
        # changes every weight, with collectives, while the copy runs: step() waits for what it modifies
        train(model, optimizer, 2, rank, start=2)
        staged_bytes = booster.checkpoint_io.async_saver.staging.nbytes  # this rank's share of the model
        booster.save_optimizer(optimizer, folder / "optim", shard=True, size_per_shard=0.0003, use_async=True)
        state, groups = full_optimizer_state(optimizer, model)
        optimizer_expected = _plain_names(state), groups
        train(model, optimizer, 1, rank, start=4)
        booster.wait()
        return expected, optimizer_expected, in_flight_after_call, _plain_names(full_state(model)), staged_bytes

    results = run_ranks(lambda ctx: ctx.phase(2, "save", save), 2, tmp_path)
    model_at_call, optimizer_at_call, _, final, _ = results[0]
    assert all(r[2] for r in results), "the call must return before the state is copied"
    # each rank staged only what it contributes (its boxes, or the replicas it writes): together, the model once
    model_bytes = sum(t.numel() * t.element_size() for t in model_at_call.values())
    assert sum(r[4] for r in results) == model_bytes and all(0 < r[4] < model_bytes for r in results)
    assert diff_keys(final, model_at_call) != [], "training changed the weights after the call"

    model = make_uneven(7)
    optimizer = make_optimizer(model)
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    booster.load_model(model, folder / "model", verify=True)
    assert diff_keys(model.state_dict(), model_at_call) == []
    booster.load_optimizer(optimizer, folder / "optim", verify=True)
    state, groups = full_optimizer_state(optimizer, model)
    assert groups == optimizer_at_call[1]
    assert state.keys() == optimizer_at_call[0].keys()
    assert all(torch.equal(state[k], v) for k, v in optimizer_at_call[0].items())


def test_async_failure_on_one_rank_is_raised_by_wait_everywhere(tmp_path):
    folder = tmp_path / "ck"

    def save():
        rank = torch.distributed.get_rank()
        booster, model, optimizer = _boosted("fsdp")
        booster.save_model(model, folder, shard=True, use_safetensors=True, size_per_shard=0.0002)
        train(model, optimizer, 1, rank)
        if rank == 1:

            fail_writes(OSError(28, "No space left on device (injected)"))
        booster.save_model(model, folder, shard=True, use_safetensors=True, size_per_shard=0.0002, use_async=True)
        try:
            booster.wait()
        except DistributedCheckpointError as exc:
            message = str(exc)
        else:
            message = None
        booster.wait()  # raised once
        return message

    messages = run_ranks(lambda ctx: ctx.phase(2, "save", save), 2, tmp_path)
    assert all(m is not None and "rank 1" in m and "No space left" in m for m in messages), messages
    plain = make_uneven(9)
    Booster().load_model(plain, folder, verify=True)
    assert diff_keys(plain.state_dict(), make_uneven(0).state_dict()) == []  # the first save, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_async_training_checkpoint_on_2_ranks_restores_the_state_at_call_time(tmp_path):
    save_dir = tmp_path / "run"

    def save():
        rank = torch.distributed.get_rank()
        booster, model, optimizer = _boosted("fsdp")
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        train(model, optimizer, 2, rank)
        scheduler.step()
        expected = full_state(model), full_optimizer_state(optimizer, model), scheduler.state_dict()
        _slow_writes(0.2)
        save_checkpoint(save_dir, booster, model, optimizer, scheduler, 0, 2, 3, use_async=True)
        in_flight = booster.checkpoint_io.async_saver.in_flight
        train(model, optimizer, 2, rank, start=2)
        scheduler.step()
        booster.wait()
        return expected, in_flight

    def load():
        booster, model, optimizer = _boosted("fsdp", seed=5)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        where = load_checkpoint(save_dir / "epoch-0_step-2", booster, model, optimizer, scheduler, verify=True)
        return where, full_state(model), full_optimizer_state(optimizer, model), scheduler.state_dict()

    def scenario(ctx):
        return ctx.phase(2, "save", save), ctx.phase(2, "load", load)

    results = run_ranks(scenario, 2, tmp_path)
    for rank in range(2):
        ((model_at_call, optim_at_call, sched_at_call), in_flight), (where, model, optim, sched) = results[rank]
        assert in_flight, "the call must return before the files are written"
        assert where == (0, 2, 6)
        assert diff_keys(model, model_at_call) == []
        assert optim[1] == optim_at_call[1] and optim[0].keys() == optim_at_call[0].keys()
        assert all(torch.equal(optim[0][k], v) for k, v in optim_at_call[0].items())
        assert sched == sched_at_call


def test_staging_failure_on_one_rank_raises_from_the_call_on_every_rank(tmp_path):
    """No rank is left with a background save waiting for a peer whose staging failed."""
    from ckptio.engine import save as engine_save

    def save():
        rank = torch.distributed.get_rank()
        booster, model, _ = _boosted("fsdp")
        if rank == 1:

            def out_of_memory(*args, **kwargs):
                raise MemoryError("cannot allocate staging buffers (injected)")

            engine_save.stage_parts = out_of_memory
        started = time.monotonic()
        try:
            booster.save_model(model, tmp_path / "m", shard=True, use_safetensors=True, use_async=True)
        except DistributedCheckpointError as exc:
            raised = str(exc)
        else:
            raised = None
        in_flight = booster.checkpoint_io.async_saver.in_flight
        booster.wait()  # nothing pending, nothing to raise
        return raised, in_flight, time.monotonic() - started

    results = run_ranks(lambda ctx: ctx.phase(2, "save", save), 2, tmp_path)
    for raised, in_flight, seconds in results:
        assert raised is not None and "rank 1" in raised and "staging buffers" in raised, raised
        assert not in_flight and seconds < 20
    assert not (tmp_path / "m").exists()


def test_a_background_copy_failure_on_one_rank_raises_from_the_next_call_on_every_rank(tmp_path):
    """The copy runs on each rank's background thread, as one collective step on the background
    group: rank 1 failing fails the save on both ranks, and the next call raises it on both (no
    rank starts a save its peer refuses); staging memory stays one reused copy of each rank's share."""
    from ckptio.async_io.staging import StagingBuffers

    def save():
        rank = torch.distributed.get_rank()
        booster, model, optimizer = _boosted("fsdp")
        saver = booster.checkpoint_io.async_saver
        booster.save_model(model, tmp_path / "m", shard=True, use_safetensors=True, use_async=True)
        train(model, optimizer, 1, rank)
        booster.wait()
        share, pointers = saver.staging.nbytes, sorted(b.data_ptr() for b in saver.staging._buffers["model"])
        real_copy = StagingBuffers.copy
        if rank == 1:

            def out_of_memory(self, snapshots, progress=None):
                raise MemoryError("cannot allocate staging buffers (injected)")

            StagingBuffers.copy = out_of_memory
        handle = booster.save_model(model, tmp_path / "m", shard=True, use_safetensors=True, use_async=True)
        train(model, optimizer, 1, rank, start=1)  # the guards never raise
        StagingBuffers.copy = real_copy
        try:
            booster.save_model(model, tmp_path / "m", shard=True, use_safetensors=True, use_async=True)
        except DistributedCheckpointError as exc:
            raised = str(exc)
        else:
            raised = None
        try:  # the failed save's handle reports it too
            handle.durable.result(timeout=0)
        except DistributedCheckpointError:
            failed = True
        else:
            failed = False
        booster.save_model(model, tmp_path / "m", shard=True, use_safetensors=True, use_async=True)
        booster.wait()
        same = saver.staging.nbytes == share and sorted(b.data_ptr() for b in saver.staging._buffers["model"]) == pointers
        return raised, failed, same, share, full_state(model)

    results = run_ranks(lambda ctx: ctx.phase(2, "save", save), 2, tmp_path)
    for raised, failed, same, _, _ in results:
        assert raised is not None and "rank 1" in raised and "staging buffers" in raised, raised
        assert failed and same
    model_bytes = sum(t.numel() * t.element_size() for t in results[0][4].values())
    assert sum(r[3] for r in results) == model_bytes  # each rank stages its share, once
    plain = make_uneven(9)
    Booster().load_model(plain, tmp_path / "m", verify=True)
    assert diff_keys(plain.state_dict(), results[0][4]) == []


@pytest.mark.parametrize("plugin", ["fsdp", "ddp"])
def test_async_single_file_optimizer_on_2_ranks(tmp_path, plugin):
    """save_optimizer's default (shard=False, one torch file): gathered on the master during the
    call, written in the background; what lands is the state at the call."""
    from ckptio.layouts import optimizer as optimizer_layout

    def save():
        rank = torch.distributed.get_rank()
        booster, model, optimizer = _boosted(plugin)
        train(model, optimizer, 2, rank)
        state, groups = full_optimizer_state(optimizer, model)
        real_save = optimizer_layout.torch_format.save

        def slow_save(*args, **kwargs):
            time.sleep(0.5)
            return real_save(*args, **kwargs)

        optimizer_layout.torch_format.save = slow_save
        booster.save_optimizer(optimizer, tmp_path / "optim.pt", use_async=True)
        in_flight = booster.checkpoint_io.async_saver.in_flight
        train(model, optimizer, 2, rank, start=2)
        booster.wait()
        return (_plain_names(state), groups), in_flight

    results = run_ranks(lambda ctx: ctx.phase(2, "save", save), 2, tmp_path)
    (state_at_call, groups_at_call), _ = results[0]
    assert all(in_flight for _, in_flight in results), "the call must return before the file is written"
    model = make_uneven(7)
    optimizer = make_optimizer(model)
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    booster.load_optimizer(optimizer, tmp_path / "optim.pt")
    state, groups = full_optimizer_state(optimizer, model)
    assert groups == groups_at_call and state.keys() == state_at_call.keys()
    assert all(torch.equal(state[k], v) for k, v in state_at_call.items())
