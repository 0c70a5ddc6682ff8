"""use_async=True: the snapshot is taken at call time, failures surface from wait(), saves queue."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from ckptio import Booster
from ckptio.async_io import AsyncSaver, StagingBuffers
from ckptio.errors import CheckpointWriteError
from ckptio.storage import local
from tests.helpers import randomize, tiny_gpt2


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state(model, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def _load_fresh(path, seed=9):
    fresh = randomize(tiny_gpt2(), seed=seed)
    Booster().load_model(fresh, path)
    return fresh


def _slow_writes(monkeypatch, delay=0.05):
    """Each file write first sleeps, so the background writer is still busy when the weights change."""
    original = local.LocalFileWriter.write

    def slow(self, name, chunks):
        time.sleep(delay)
        return original(self, name, chunks)

    monkeypatch.setattr(local.LocalFileWriter, "write", slow)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "ckptio-tmp" in p.name or "ckptio-old" in p.name)


@pytest.mark.parametrize("shard,name", [(True, "ckpt"), (False, "w.safetensors"), (False, "w.bin")])
def test_async_save_is_the_state_at_call_time(tmp_path, monkeypatch, shard, name):
    _slow_writes(monkeypatch)
    booster = Booster()
    model = tiny_gpt2()
    expected = _snapshot(model)
    path = tmp_path / name
    if name.endswith(".bin"):  # the same bytes as a sync save: no staging storage leaks into the file
        booster.save_model(model, tmp_path / "sync.bin")
        booster.save_model(model, path, use_async=True)
        booster.wait()
        assert path.stat().st_size == (tmp_path / "sync.bin").stat().st_size
    booster.save_model(model, path, shard=shard, use_safetensors=True, size_per_shard=0.05, use_async=True)
    assert booster.checkpoint_io.async_saver.in_flight
    booster.wait_staged()  # changes outside optimizer.step() wait for the copy
    with torch.no_grad():  # training goes on at once
        for t in model.state_dict().values():
            t.add_(1)
    booster.wait()
    assert not booster.checkpoint_io.async_saver.in_flight
    _assert_state(_load_fresh(path), expected)
    assert _leftovers(tmp_path) == []


def test_writer_failure_surfaces_from_wait_and_keeps_previous_checkpoint(tmp_path, monkeypatch):
    booster = Booster()
    model = tiny_gpt2()
    path = tmp_path / "ckpt"
    booster.save_model(model, path, shard=True, use_safetensors=True, size_per_shard=0.05)
    before = _snapshot(model)
    files_before = sorted(p.name for p in path.iterdir())

    original = local.LocalFileWriter.write
    calls = []

    def failing(self, name, chunks):
        calls.append(name)
        if len(calls) == 2:  # the first shard lands, the second fails
            raise CheckpointWriteError("injected failure", path=self.root / name)
        return original(self, name, chunks)

    monkeypatch.setattr(local.LocalFileWriter, "write", failing)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.mul_(2)
    booster.save_model(model, path, shard=True, use_safetensors=True, size_per_shard=0.05, use_async=True)
    with pytest.raises(CheckpointWriteError, match="injected failure"):
        booster.wait()
    booster.wait()  # raised once, not again
    assert len(calls) >= 2
    assert sorted(p.name for p in path.iterdir()) == files_before
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()
    _assert_state(_load_fresh(path), before)


def test_writer_failure_surfaces_from_the_next_save(tmp_path, monkeypatch):
    booster = Booster()
    model = tiny_gpt2()

    def broken(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local._Sink, "finish", broken)
    booster.save_model(model, tmp_path / "a", shard=True, use_safetensors=True, use_async=True)
    while booster.checkpoint_io.async_saver.in_flight:
        time.sleep(0.01)
    monkeypatch.undo()
    with pytest.raises(CheckpointWriteError, match="disk full"):
        booster.save_model(model, tmp_path / "b", shard=True, use_safetensors=True, use_async=True)
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()  # the failed save's error was reported first; nothing started
    booster.save_model(model, tmp_path / "b", shard=True, use_safetensors=True, use_async=True)
    booster.wait()
    _assert_state(_load_fresh(tmp_path / "b"), _snapshot(model))


def test_two_quick_saves_both_complete(tmp_path, monkeypatch):
    _slow_writes(monkeypatch, delay=0.02)
    booster = Booster()
    model = tiny_gpt2()
    first = _snapshot(model)
    booster.save_model(model, tmp_path / "one", shard=True, use_safetensors=True, size_per_shard=0.05, use_async=True)
    booster.wait_staged()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.add_(3)
    second = _snapshot(model)
    booster.save_model(model, tmp_path / "two", shard=True, use_safetensors=True, size_per_shard=0.05, use_async=True)
    booster.wait_staged()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.zero_()
    # and a third into the same folder as the first, replacing it
    booster.save_model(model, tmp_path / "one", shard=True, use_safetensors=True, size_per_shard=0.05, use_async=True)
    booster.wait()
    _assert_state(_load_fresh(tmp_path / "two"), second)
    _assert_state(_load_fresh(tmp_path / "one"), _snapshot(model))
    assert first  # the first save was replaced by the third, never mixed with it
    assert _leftovers(tmp_path) == []


def test_staging_buffers_are_reused_and_snapshot_nested_state():
    staging = StagingBuffers(pin_memory=False)
    weight = torch.randn(8, 4)
    original = weight.clone()
    state = {"w": weight, "w_t": weight.t(), "tied": weight, "groups": [{"lr": 0.1, "params": [0]}]}
    staged = staging.stage_tree(state, slot="optimizer")
    ptr = staged["w"].data_ptr()
    assert staged["tied"] is staged["w"]
    assert torch.equal(staged["w_t"], weight.t()) and staged["w_t"].is_contiguous()
    state["groups"][0]["lr"] = 0.5
    weight.add_(1)
    assert staged["groups"][0]["lr"] == 0.1
    assert torch.equal(staged["w"], original)
    bound = staging.nbytes
    again = staging.stage_tree(state, slot="optimizer")
    assert again["w"].data_ptr() == ptr  # the same memory, no new allocation
    assert staging.nbytes == bound == 2 * weight.numel() * 4  # w and w_t; the tied alias is not copied twice
    assert staged["w"].untyped_storage().nbytes() == weight.numel() * 4  # own storage: torch.save writes no more
    staging.release()
    assert staging.nbytes == 0


def test_async_saver_runs_one_job_at_a_time():
    saver = AsyncSaver(StagingBuffers(pin_memory=False))
    running = []
    overlap = threading.Event()

    def write(tag):
        if running:
            overlap.set()
        running.append(tag)
        time.sleep(0.05)
        running.remove(tag)

    for tag in range(3):
        saver.submit(lambda staging, tag=tag: tag, write)
    saver.wait()
    assert not overlap.is_set()


def test_interpreter_exit_waits_for_the_save(tmp_path):
    script = textwrap.dedent(
        f"""
        import time, torch
        from ckptio import Booster
        from ckptio.storage import local
        original = local.LocalFileWriter.write
        def slow(self, name, chunks):
            time.sleep(0.3)
            return original(self, name, chunks)
        local.LocalFileWriter.write = slow
        model = torch.nn.Linear(64, 64)
        torch.save(model.state_dict(), {str(tmp_path / "expected.pt")!r})
        Booster().save_model(model, {str(tmp_path / "ckpt")!r}, shard=True, use_safetensors=True, use_async=True)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    model = torch.nn.Linear(64, 64)
    Booster().load_model(model, tmp_path / "ckpt", verify=True)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


_CTRL_C_CHILD = """
import sys, time, torch
from ckptio import Booster
from ckptio.storage import local
original = local.LocalFileWriter.write
def slow(self, name, chunks):
    time.sleep(float(sys.argv[3]))
    return original(self, name, chunks)
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
booster = Booster()
booster.save_model(torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)]), sys.argv[1], shard=True)
torch.save(model.state_dict(), sys.argv[2])
local.LocalFileWriter.write = slow  # several rounds of the writer's threads, each sys.argv[3] s long
booster.save_model(model, sys.argv[1], shard=True, use_safetensors=True, size_per_shard=0.02, use_async=True)
print("submitted", flush=True)
time.sleep(60)
"""


def test_ctrl_c_during_an_async_save_leaves_it_committed_or_nothing(tmp_path):
    """A real SIGINT: the first unwinds the main thread and exit waits for the save, which
    commits; a second one while exit waits stops the save, which removes its staging folder and
    leaves the previous checkpoint. Never a staging folder, never a half-written checkpoint.
    Two children at once: one interrupted once (about 2 s of writing), one twice (its writing
    outlasts the test's steps, however loaded the machine: the second interrupt lands mid-save)."""
    import signal

    children = {}
    for interrupts in (1, 2):
        folder = tmp_path / str(interrupts)
        folder.mkdir()
        seconds_a_file = "0.5" if interrupts == 1 else "5"
        argv = [sys.executable, "-c", _CTRL_C_CHILD, str(folder / "ckpt"), str(folder / "expected.pt"), seconds_a_file]
        children[interrupts] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors = {}
    try:
        for child in children.values():
            assert child.stdout.readline().strip() == "submitted", child.stderr.read()
        previous = _snapshot(_load_linear_stack(tmp_path / "2" / "ckpt"))
        for child in children.values():
            child.send_signal(signal.SIGINT)
        for line in children[2].stderr:  # the first interrupt's traceback: the main thread has unwound
            if line.startswith("KeyboardInterrupt"):
                break
        time.sleep(0.3)  # exit is waiting for the save now (which has seconds of writing left)
        children[2].send_signal(signal.SIGINT)
        for interrupts, child in children.items():
            errors[interrupts] = child.communicate(timeout=120)[1]
    finally:
        for child in children.values():
            child.kill()
    for interrupts, child in children.items():
        assert child.returncode == -signal.SIGINT, errors[interrupts]
        assert _leftovers(tmp_path / str(interrupts)) == [], errors[interrupts]
    committed = _load_linear_stack(tmp_path / "1" / "ckpt", verify=True)
    _assert_state(committed, torch.load(tmp_path / "1" / "expected.pt", weights_only=True))
    assert "stopping it, nothing of it is committed" in errors[2], errors[2]
    _assert_state(_load_linear_stack(tmp_path / "2" / "ckpt", verify=True), previous)


def _load_linear_stack(path, verify=False):
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
    Booster().load_model(model, path, verify=verify)
    return model
