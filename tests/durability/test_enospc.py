"""A full disk in the middle of a save: a clear error naming the file and saying the disk is
full, the previous checkpoint still there and loadable with exactly its old values, and no
temporary left behind to eat the space that is left.

Each test runs twice: on a real small filesystem (a tmpfs the test mounts, where the kernel
itself answers ENOSPC; skipped where mounting is not allowed) and on an emulated disk whose
capacity the storage layer enforces (ENOSPC injected into the write path, runs everywhere).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptio import Booster, CheckpointManager, CheckpointWriteError
from ckptio.formats.naming import OLD_MARK, TMP_MARK
from ckptio.storage import local

MIB = 1024 * 1024
CAPACITY = 20 * MIB


@dataclass
class Disk:
    root: Path
    kind: str


@contextlib.contextmanager
def _tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={CAPACITY}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the injected disk covers this case")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextlib.contextmanager
def _emulated(where: Path, monkeypatch) -> Iterator[Path]:
    """A disk of CAPACITY bytes: the storage layer's writes fail with ENOSPC beyond it (deletes free space)."""
    where.mkdir()
    original = local._Sink._write_all

    def used() -> int:
        return sum(p.stat().st_size for p in where.rglob("*") if p.is_file())

    def write_all(self, views):
        if used() + sum(len(v) for v in views) > CAPACITY:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, views)

    monkeypatch.setattr(local._Sink, "_write_all", write_all)
    yield where


@pytest.fixture(params=["tmpfs", "emulated"])
def disk(request, tmp_path, monkeypatch) -> Iterator[Disk]:
    if request.param == "tmpfs" and os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the emulated disk covers this case")
    context = _tmpfs(tmp_path / "fs") if request.param == "tmpfs" else _emulated(tmp_path / "fs", monkeypatch)
    with context as root:
        yield Disk(root, request.param)


def big_model(seed: int, layers: int = 12) -> nn.Module:
    """``layers`` MiB of float32 weights (a 512 x 512 Linear is 1 MiB), all from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(512, 512, bias=False) for _ in range(layers)))


def assert_same(model: nn.Module, expected: nn.Module) -> None:
    for (key, a), b in zip(model.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(a, b), key


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if TMP_MARK in p.name or OLD_MARK in p.name)


def assert_disk_full_error(info: pytest.ExceptionInfo, root: Path) -> None:
    message = str(info.value)
    assert "disk full" in message, message
    assert str(root) in message, f"the error must name the file being written: {message}"


@pytest.mark.parametrize("shard", [True, False], ids=["folder", "one-file"])
def test_full_disk_keeps_previous_model_checkpoint(disk, shard):
    target = disk.root / ("model" if shard else "model.safetensors")
    first = big_model(1)
    Booster().save_model(first, target, shard=shard, use_safetensors=True, size_per_shard=4)
    with pytest.raises(CheckpointWriteError) as info:  # 12 MiB more does not fit beside the first 12 MiB
        Booster().save_model(big_model(2), target, shard=shard, use_safetensors=True, size_per_shard=4)
    assert_disk_full_error(info, disk.root)
    assert leftovers(disk.root) == []
    loaded = big_model(3)
    Booster().load_model(loaded, target, verify=True)
    assert_same(loaded, first)


def test_full_disk_during_async_save_is_raised_at_wait(disk):
    target = disk.root / "model"
    first = big_model(1)
    booster = Booster()
    booster.save_model(first, target, shard=True, use_safetensors=True, size_per_shard=4)
    booster.save_model(big_model(2), target, shard=True, use_safetensors=True, size_per_shard=4, use_async=True)
    with pytest.raises(CheckpointWriteError) as info:
        booster.wait()
    assert_disk_full_error(info, disk.root)
    booster.wait()  # raised once, not again
    assert leftovers(disk.root) == []
    loaded = big_model(3)
    Booster().load_model(loaded, target, verify=True)
    assert_same(loaded, first)


def _trainer(seed: int):
    model = big_model(seed, layers=4)  # 4 MiB of weights, 12 MiB with Adam's two moments
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 512)).sum().backward()
    optimizer.step()
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    return booster, model, optimizer


def test_full_disk_during_training_checkpoint_keeps_the_latest(disk):
    booster, model, optimizer = _trainer(1)
    manager = CheckpointManager(disk.root / "run", booster, keep_last=3)
    manager.save(model, optimizer, None, 0, 10, 4)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_state = {k: v.clone() for k, v in optimizer.state[next(iter(model.parameters()))].items()}

    _, model2, optimizer2 = _trainer(2)
    with pytest.raises(CheckpointWriteError) as info:
        manager.save(model2, optimizer2, None, 0, 20, 4)
    assert_disk_full_error(info, disk.root)
    assert leftovers(disk.root) == []

    booster3, model3, optimizer3 = _trainer(3)
    resumer = CheckpointManager(disk.root / "run", booster3)
    assert resumer.latest().name == "epoch-0_step-10"
    assert resumer.resume(model3, optimizer3, None, verify=True) == (0, 10, 40)
    for key, value in model3.state_dict().items():
        assert torch.equal(value, saved[key]), key
    for key, value in optimizer3.state[next(iter(model3.parameters()))].items():
        assert torch.equal(value, saved_state[key]), key
