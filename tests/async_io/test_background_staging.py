"""use_async=True returns before the state is copied: the copy runs behind the training loop,
the boosted optimizer's step() and the boosted model's forward wait only for the copies of what
they modify, anything else is refused loudly unless ``booster.wait_staged()`` came first, and
the staging memory is one reused copy.

The copy is slowed down (a sleep per tensor), so each test knows the copy is still running when
training touches the state."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from ckptio import Booster
from ckptio.async_io import staging as staging_module
from ckptio.errors import StateChangedError
from ckptio.training import load_checkpoint, save_checkpoint


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _boosted():
    booster = Booster()
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer, *_ = booster.boost(model, optimizer)
    _step(model, optimizer)  # Adam's state exists
    return booster, model, optimizer


def _step(model, optimizer, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    model(torch.randn(6, 8, generator=gen)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _state(model, optimizer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for k, v in state.items():
            out[f"optim/{names[id(p)]}/{k}"] = v.detach().clone()
    return out


def _assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert different == [], different


def _loaded(path) -> dict[str, torch.Tensor]:
    booster = Booster()
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer, *_ = booster.boost(model, optimizer)
    _step(model, optimizer, seed=99)  # other values, and Adam's state to load into
    load_checkpoint(path, booster, model, optimizer, None, restore_rng=False)
    return _state(model, optimizer)


@pytest.fixture
def slow_copy(monkeypatch):
    """Each tensor's copy takes ``delay`` seconds longer (``slow_only``: only tensors it accepts);
    returns the list of copied sources, in copy order."""
    copied: list[torch.Tensor] = []
    original = staging_module._copy

    def install(delay: float = 0.02, slow_only=lambda src: True):
        def slow(dest, src, stream):
            if slow_only(src):
                time.sleep(delay)
            copied.append(src)
            return original(dest, src, stream)

        monkeypatch.setattr(staging_module, "_copy", slow)
        return copied

    return install


def test_the_call_returns_before_the_copy_and_training_goes_on_at_once(tmp_path, slow_copy):
    booster, model, optimizer = _boosted()
    copied = slow_copy(0.05)  # the 3rd copy ends 0.15 s after the call: ample, even loaded
    at_call = _state(model, optimizer)
    path = save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 1, 1, use_async=True)
    handle = booster.checkpoint_io.last_save
    assert not handle.staged.done() and len(copied) < 3, "the call must return before the state is copied"
    _step(model, optimizer, seed=1)  # forward (BatchNorm's buffers), backward, step: no wait_staged()
    # step() waited for the copy of what it modifies (the checkpoint below holds the call's state);
    # the save marks itself staged on its own thread a moment after the last copy
    handle.staged.result(timeout=60)
    after = _state(model, optimizer)
    booster.wait()
    assert handle.durable.done()
    assert handle.blocked_seconds >= handle.call_seconds > 0
    _assert_equal(_loaded(path), at_call)  # the state of the call, not the one after the step
    assert any(not torch.equal(after[k], at_call[k]) for k in at_call), "training changed the state"


def test_forward_waits_only_for_the_buffers_and_step_only_for_its_own_state(tmp_path, slow_copy):
    booster, model, optimizer = _boosted()
    params_and_state = {staging_module.storage_key(t) for t in (*model.parameters(), *[
        v for s in optimizer.state.values() for v in s.values()
    ])}  # fmt: skip
    ema = {"shadow": torch.ones(4)}  # a stateful object's tensor: neither guard modifies it

    class Ema:
        def state_dict(self):
            return ema

        def load_state_dict(self, state):
            ema.update(state)

    copied = slow_copy(0.3, slow_only=lambda src: staging_module.storage_key(src) == staging_module.storage_key(
        ema["shadow"]
    ))  # fmt: skip
    buffers = {staging_module.storage_key(b) for b in model.buffers()}
    started = time.perf_counter()
    save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 1, 1, use_async=True, stateful={"ema": Ema()})
    handle = booster.checkpoint_io.last_save
    _step(model, optimizer, seed=1)
    # the EMA's slow copy comes last: neither the forward nor the step waited for it
    assert not handle.staged.done() and time.perf_counter() - started < 0.3
    booster.wait()
    groups = [
        0 if k in buffers else 1 if k in params_and_state else 2 for k in map(staging_module.storage_key, copied)
    ]
    assert groups == sorted(groups) and set(groups) == {0, 1, 2}, groups  # buffers, then step's tensors, then the rest


def test_a_change_outside_the_guards_fails_the_save_loudly(tmp_path, slow_copy):
    booster, model, optimizer = _boosted()
    first = save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 1, 1)
    at_first = _state(model, optimizer)
    slow_copy(0.02)
    save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 1, 1, use_async=True)
    with torch.no_grad():
        model[-1].weight.add_(1)  # no wait_staged(): the copy may not have reached it
    with pytest.raises(StateChangedError, match=r"3\.weight.*modified in place.*wait_staged\(\)"):
        booster.wait()
    _assert_equal(_loaded(first), at_first)  # the previous checkpoint stays
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_background_copy_raises_from_the_next_call_and_its_handle(tmp_path, monkeypatch):
    booster, model, optimizer = _boosted()

    def out_of_memory(self, snapshots, progress=None):
        raise MemoryError("cannot allocate staging buffers (injected)")

    monkeypatch.setattr(staging_module.StagingBuffers, "copy", out_of_memory)
    handle = booster.save_model(model, tmp_path / "m", shard=True, use_async=True)
    with pytest.raises(MemoryError, match="injected"):
        handle.staged.result(timeout=60)
    with pytest.raises(MemoryError, match="injected"):
        handle.durable.wait(timeout=60)
    booster.wait_staged()  # never raises
    _step(model, optimizer)  # nor do the guards
    monkeypatch.undo()
    with pytest.raises(MemoryError, match="injected"):  # the next call raises it, once
        booster.save_model(model, tmp_path / "m", shard=True, use_async=True)
    assert not (tmp_path / "m").exists()
    handle = booster.save_model(model, tmp_path / "m", shard=True, use_async=True)
    handle.durable.result()


def test_staging_memory_is_one_reused_copy_of_the_state(tmp_path):
    booster, model, optimizer = _boosted()
    # every tensor of the model and of Adam's state (the step counts go to the JSON description)
    staged_bytes = sum(t.numel() * t.element_size() for k, t in _state(model, optimizer).items() if k[-5:] != "/step")
    pointers = None
    for step in range(3):
        save_checkpoint(tmp_path, booster, model, optimizer, None, 0, step, 1, use_async=True)
        _step(model, optimizer, seed=step)
        booster.wait()
        staging = booster.checkpoint_io.async_saver.staging
        assert staging.nbytes == staged_bytes
        now = sorted(b.data_ptr() for bufs in staging._buffers.values() for b in bufs)
        assert pointers is None or now == pointers  # the same buffers, no new allocation
        pointers = now


def test_a_sync_save_returns_a_complete_handle(tmp_path):
    booster, model, optimizer = _boosted()
    handle = booster.save_model(model, tmp_path / "m.safetensors")
    assert handle.staged.done() and handle.durable.done() and handle.durable.result() is None
    handle = booster.save_optimizer(optimizer, tmp_path / "o.bin")
    assert handle.durable.done()
