"""The CUDA path of async saves: pinned staging buffers reused across saves, device-to-host copies
on a side stream ordered after the work the caller's stream had queued at the call, and guards
that make the optimizer's stream wait for the copies on the GPU instead of blocking the CPU.

Skipped without CUDA; ``scripts/cuda_checks.sh`` runs them on a GPU machine, where
``CKPTIO_REQUIRE_CUDA=1`` turns a missing GPU into a failure instead of a skip.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from ckptio import Booster
from ckptio.training import load_checkpoint, save_checkpoint

if not torch.cuda.is_available():
    if os.environ.get("CKPTIO_REQUIRE_CUDA") == "1":
        raise RuntimeError("CKPTIO_REQUIRE_CUDA=1 but torch.cuda.is_available() is False")
    pytest.skip("no CUDA device", allow_module_level=True)

DEVICE = torch.device("cuda", torch.cuda.current_device())


def _gpu_busy(seconds: float) -> None:
    """Queue about ``seconds`` of spinning on the current stream (calibrated once)."""
    global _CYCLES_PER_S
    if "_CYCLES_PER_S" not in globals():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(50_000_000)
        end.record()
        end.synchronize()
        _CYCLES_PER_S = 50_000_000 / (start.elapsed_time(end) / 1000)
    torch.cuda._sleep(int(_CYCLES_PER_S * seconds))


def _boosted(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 8)).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    _step(model, optimizer)
    return booster, model, optimizer


def _step(model, optimizer, seed: int = 0) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    model(torch.randn(16, 64, device=DEVICE, generator=gen)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _cpu_state(model, optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for k, v in state.items():
            out[f"optim/{names[id(p)]}/{k}"] = v.detach().cpu().clone()
    return out


def _loaded(path) -> dict[str, torch.Tensor]:
    booster, model, optimizer = _boosted(seed=7)
    load_checkpoint(path, booster, model, optimizer, None, restore_rng=False)
    return _cpu_state(model, optimizer)


def _assert_equal(got, expected) -> None:
    assert got.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


def test_the_snapshot_is_the_state_of_the_call_and_the_step_waits_on_the_gpu(tmp_path):
    booster, model, optimizer = _boosted()
    before = _cpu_state(model, optimizer)
    expected = {**before, **{f"model/{n}": before[f"model/{n}"] + 1 for n, _ in model.named_parameters()}}
    _gpu_busy(1.5)  # the stream is busy: the next change is only queued when the save is called
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)  # queued before the call: the checkpoint must hold it
    started = time.perf_counter()
    path = save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 1, 1, use_async=True)
    handle = booster.checkpoint_io.last_save
    _step(model, optimizer, seed=1)  # queued after the call; its stream waits for the copies on the GPU
    cpu_seconds = time.perf_counter() - started
    assert not handle.staged.done(), "the copies wait behind the GPU's queued work"
    assert cpu_seconds < 0.75, f"the CPU waited {cpu_seconds:.2f} s for GPU copies (it should only queue them)"
    after = _cpu_state(model, optimizer)
    booster.wait()
    _assert_equal(_loaded(path), expected)  # with the +1 queued before the call, without the step after it
    assert any(not torch.equal(after[k], expected[k]) for k in expected)


def test_pinned_buffers_are_reused_and_copies_run_on_a_side_stream(tmp_path):
    booster, model, optimizer = _boosted()
    saver = booster.checkpoint_io.async_saver
    pointers = None
    for n in range(3):
        save_checkpoint(tmp_path, booster, model, optimizer, None, 0, n, 1, use_async=True)
        _step(model, optimizer, seed=n)
        booster.wait()
        buffers = [b for bufs in saver.staging._buffers.values() for b in bufs]
        assert buffers and all(b.device.type == "cpu" and b.is_pinned() for b in buffers)
        now = sorted(b.data_ptr() for b in buffers)
        assert pointers is None or now == pointers
        pointers = now
    (stream,) = saver.staging._streams.values()
    assert stream != torch.cuda.current_stream(DEVICE) and stream != torch.cuda.default_stream(DEVICE)
    bytes_on_gpu = sum(t.numel() * t.element_size() for k, t in _cpu_state(model, optimizer).items()
                       if not k.endswith("/step"))  # fmt: skip
    assert saver.staging.nbytes == bytes_on_gpu


def test_wait_staged_then_change_in_place(tmp_path):
    booster, model, optimizer = _boosted()
    expected = _cpu_state(model, optimizer)
    _gpu_busy(0.5)
    path = save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 1, 1, use_async=True)
    booster.wait_staged()  # the copies are complete (CPU-synchronous)
    assert booster.checkpoint_io.last_save.staged.done()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    booster.wait()
    _assert_equal(_loaded(path), expected)


def test_sync_stage_tree_of_cuda_tensors_is_complete_on_return():
    from ckptio.async_io import StagingBuffers

    staging = StagingBuffers()
    t = torch.randn(1024, 1024, device=DEVICE)
    _gpu_busy(0.3)
    t.mul_(3)  # queued behind the spin
    staged = staging.stage_tree({"t": t, "n": 3}, slot="x")
    expected = t.cpu()
    assert staged["t"].is_pinned() and torch.equal(staged["t"], expected) and staged["n"] == 3
