"""Checkpoints on S3 (a real moto server on 127.0.0.1): round trips, the commit marker, interrupted saves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import fsspec
import pytest
import torch
from torch import nn

from ckptio import Booster, CheckpointNotFoundError, DistCoordinator
from ckptio.formats.naming import COMMIT_MARKER, REMOTE_VERSION_PREFIX
from ckptio.storage import fsspec_storage
from ckptio.training import load_checkpoint, save_checkpoint


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))


def same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def listing(url: str) -> list[str]:
    fs, root = fsspec_storage.filesystem(url)
    fs.invalidate_cache()
    return sorted(p[len(root) + 1 :] for p in fs.find(root))


def test_sharded_model_round_trip_and_layout(s3, s3_client):
    url = f"{s3}/run/model"
    fs, _ = fsspec_storage.filesystem(url)
    assert type(fs).__name__ == {"obstore": "ObstoreS3FileSystem", "s3fs": "S3FileSystem"}[s3_client]
    model, other = make_model(0), make_model(1)
    booster = Booster()
    booster.save_model(model, url, shard=True, size_per_shard=0.002, use_safetensors=True)
    files = listing(url)
    assert files[0] == COMMIT_MARKER
    version = json.loads(fsspec.open(f"{url}/{COMMIT_MARKER}", "rb").open().read())["version"]
    assert version.startswith(REMOTE_VERSION_PREFIX)
    assert f"{version}/model.safetensors.index.json" in files
    assert f"{version}/ckptio_manifest.json" in files
    assert sum(f.endswith(".safetensors") for f in files) >= 2
    assert not same(model, other)
    booster.load_model(other, url, verify=True)
    assert same(model, other)


def test_single_file_round_trip(s3):
    url = f"{s3}/weights/model.safetensors"
    model, other = make_model(0), make_model(1)
    Booster().save_model(model, url)
    assert listing(f"{s3}/weights") == ["model.safetensors"]
    Booster().load_model(other, url)
    assert same(model, other)


def test_resave_replaces_old_version_whole(s3):
    url = f"{s3}/model"
    first, second, dest = make_model(0), make_model(1), make_model(2)
    booster = Booster()
    booster.save_model(first, url, shard=True, use_safetensors=True)
    old = fsspec_storage.read_marker(*fsspec_storage.filesystem(url))
    booster.save_model(second, url, shard=True, size_per_shard=0.002, use_safetensors=True)
    new = fsspec_storage.read_marker(*fsspec_storage.filesystem(url))
    assert new != old
    assert not any(f.startswith(old) for f in listing(url))  # the old version is deleted after the flip
    booster.load_model(dest, url)
    assert same(dest, second)


def test_interrupted_save_is_never_loaded(s3, monkeypatch):
    url = f"{s3}/model"
    good, newer, dest = make_model(0), make_model(1), make_model(2)
    booster = Booster()

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed before the marker")

    # A first save that dies after every file but before the commit marker: incomplete.
    with monkeypatch.context() as m:
        m.setattr(fsspec_storage, "commit_marker", die)
        with pytest.raises(KeyboardInterrupt):
            booster.save_model(good, url, shard=True, use_safetensors=True)
    assert any(f.startswith(REMOTE_VERSION_PREFIX) for f in listing(url))
    assert COMMIT_MARKER not in listing(url)
    with pytest.raises(CheckpointNotFoundError, match="incomplete checkpoint"):
        booster.load_model(dest, url)
    assert not fsspec_storage.exists(url)

    # A good save, then a re-save that dies: readers still get the good one, whole.
    booster.save_model(good, url, shard=True, use_safetensors=True)
    with monkeypatch.context() as m:
        m.setattr(fsspec_storage, "commit_marker", die)
        with pytest.raises(KeyboardInterrupt):
            booster.save_model(newer, url, shard=True, size_per_shard=0.002, use_safetensors=True)
    booster.load_model(dest, url, verify=True)
    assert same(dest, good)
    # The next successful save removes the debris of the interrupted one.
    booster.save_model(newer, url, shard=True, use_safetensors=True)
    assert sum(f.startswith(REMOTE_VERSION_PREFIX) for f in {p.split("/")[0] for p in listing(url)}) == 1
    booster.load_model(dest, url)
    assert same(dest, newer)


def test_upload_dying_mid_file_leaves_no_object(s3, s3_client, monkeypatch):
    """A single-file save whose upload fails midway: the object never appears (multipart aborted)."""
    url = f"{s3}/w/model.bin"
    real = fsspec_storage.FsspecFileWriter._open_object

    class ResetAfterHalf:
        """The store's file object, whose connection resets half-way through the first write."""

        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            view = memoryview(data).cast("B")
            self.fh.write(view[: len(view) // 2])
            raise OSError("connection reset")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __setattr__(self, name, value):
            if name == "fh":
                object.__setattr__(self, name, value)
            else:
                setattr(self.fh, name, value)

    monkeypatch.setattr(fsspec_storage.FsspecFileWriter, "_open_object", lambda self, n: ResetAfterHalf(real(self, n)))
    with pytest.raises(OSError):
        Booster().save_model(make_model(0), url)
    fs, path = fsspec_storage.filesystem(url)
    fs.invalidate_cache()
    assert not fs.exists(path)


def test_a_buffer_reused_after_write_uploads_what_it_held_at_the_write(s3, s3_client):
    """torch.save and the staging buffers reuse their memory once write() returns; obstore's
    writer keeps a reference to what it was given until it sends the part."""
    fs, root = fsspec_storage.filesystem(f"{s3}/reuse")
    buf = bytearray(3 * 1024 * 1024)
    expected = b"".join(bytes([i + 1]) * len(buf) for i in range(4))
    writer = fsspec_storage.FsspecFileWriter(fs, root)

    def chunks():
        for i in range(4):
            buf[:] = bytes([i + 1]) * len(buf)
            yield memoryview(buf)

    record = writer.write("x.bin", chunks())
    assert record.size == len(expected)
    assert fs.cat_file(f"{root}/x.bin") == expected


def test_optimizer_and_training_checkpoint_round_trip(s3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, 0.5)
    booster = Booster()
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, None, None, scheduler)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        scheduler.step()

    booster.save_optimizer(optimizer, f"{s3}/optim", shard=True)
    fresh_opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    booster.load_optimizer(fresh_opt, f"{s3}/optim")
    for p in model.parameters():
        assert torch.equal(fresh_opt.state[p]["exp_avg"], optimizer.state[p]["exp_avg"])

    url = save_checkpoint(s3 + "/train", booster, model, optimizer, scheduler, 1, 3, 8, DistCoordinator())
    assert url == f"{s3}/train/epoch-1_step-3"
    torch.manual_seed(5)
    model2 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 2, 0.5)
    b2 = Booster()
    model2, opt2, _, _, sched2 = b2.boost(model2, opt2, None, None, sched2)
    epoch, step, start = load_checkpoint(url, b2, model2, opt2, sched2, verify=True)
    assert (epoch, step, start) == (1, 3, 24)
    assert same(model, model2)
    assert sched2.state_dict() == scheduler.state_dict()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])


def test_missing_url_is_a_clear_error(s3):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        Booster().load_model(make_model(0), f"{s3}/nothing/here")


def test_cli_on_s3_urls(s3, s3_server, tmp_path):
    """inspect / verify / convert / diff take s3:// URLs (configured through fsspec's env variables)."""
    model = make_model(0)
    Booster().save_model(model, f"{s3}/ck", shard=True, size_per_shard=0.002, use_safetensors=True)
    local = tmp_path / "local.safetensors"
    env = {**os.environ, "FSSPEC_S3_ENDPOINT_URL": s3_server, "FSSPEC_S3_KEY": "testing", "FSSPEC_S3_SECRET": "testing"}

    def ckptio(*args):
        return subprocess.run(
            [sys.executable, "-m", "ckptio.cli", *args], capture_output=True, text=True, env=env, timeout=120
        )

    # One process: inspect + convert to an s3 folder; then verify and diff across s3 and local.
    out = ckptio("convert", f"{s3}/ck", f"{s3}/ck-bin", "--format", "bin", "-q")
    assert out.returncode == 0, out.stderr
    out = ckptio("convert", f"{s3}/ck-bin", str(local), "-q")
    assert out.returncode == 0, out.stderr
    out = ckptio("diff", f"{s3}/ck", str(local), "-q")
    assert out.returncode == 0 and "EQUAL" in out.stdout, out.stdout + out.stderr
    other = make_model(1)
    Booster().load_model(other, str(local))
    assert same(model, other)
    out = ckptio("convert", str(local), f"{s3}/ck-bin", "-q")
    assert out.returncode == 2 and "already exists" in out.stderr
    out = ckptio("inspect", f"{s3}/ck-bin", "--json", "-q")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["format"] == "torch" and info["tensor_count"] == 6 and info["path"] == f"{s3}/ck-bin"


def test_library_functions_take_any_fsspec_url():
    """save_state_dict / load_into directly, on fsspec's in-memory filesystem."""
    from ckptio.state_dict import load_into, save_state_dict

    state = {"w": torch.randn(40, 10), "b": torch.arange(7)}
    url = f"memory://ckptio-test-{os.getpid()}/ck"
    save_state_dict(state, url, shard=True, size_per_shard=500 / 2**20, use_safetensors=True)
    dest = {"w": torch.empty(40, 10), "b": torch.empty(7, dtype=torch.long)}
    report = load_into(dest, url, verify=True)
    assert report.ok and torch.equal(dest["w"], state["w"]) and torch.equal(dest["b"], state["b"])
    fs, root = fsspec_storage.filesystem(url)
    fs.rm(root, recursive=True)


def test_async_save_to_s3_writes_in_the_background_and_commits_once_durable(s3):
    """The same engine and commit as on disk: use_async=True returns after staging; the marker
    appears only when the background upload is complete, with the state of the call."""
    url = f"{s3}/async/model"
    model, other = make_model(0), make_model(1)
    booster = Booster()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    booster.save_model(model, url, shard=True, size_per_shard=0.002, use_safetensors=True, use_async=True)
    booster.wait_staged()  # a change outside optimizer.step() waits for the copy
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on: the save must hold the state of the call
    booster.wait()
    assert COMMIT_MARKER in listing(url)
    booster.load_model(other, url, verify=True)
    got = other.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_checkpoint_synced_down_with_an_ordinary_tool_loads_inspects_and_verifies(s3, tmp_path, monkeypatch):
    """``aws s3 sync`` copies the marker and every version prefix as they are; the local copy
    reads the committed version, like the URL, and never the debris of an interrupted save."""
    from ckptio.tools import inspect_checkpoint, verify_checkpoint

    good, newer, dest = make_model(0), make_model(1), make_model(2)
    booster = Booster()
    booster.save_model(good, f"{s3}/model", shard=True, size_per_shard=0.002, use_safetensors=True)
    saved = make_model(0)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed before the marker")

    with monkeypatch.context() as m:  # a re-save that dies: its version is left beside the good one
        m.setattr(fsspec_storage, "commit_marker", die)
        with pytest.raises(KeyboardInterrupt):
            booster.save_model(newer, f"{s3}/model", shard=True, use_safetensors=True)
    optimizer = torch.optim.Adam(good.parameters())
    good(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    booster.boost(good, optimizer)
    save_checkpoint(f"{s3}/run", booster, good, optimizer, None, 0, 5, 4, DistCoordinator())

    fs, root = fsspec_storage.filesystem(s3)
    fs.invalidate_cache()
    fs.get(root, str(tmp_path / "synced"), recursive=True)  # what `aws s3 sync` leaves
    local = tmp_path / "synced" / "model"
    versions = sorted(p.name for p in local.iterdir() if p.name.startswith(REMOTE_VERSION_PREFIX))
    assert (local / COMMIT_MARKER).is_file() and len(versions) == 2

    booster.load_model(dest, local, verify=True)
    assert same(dest, saved)
    info = inspect_checkpoint(local)
    assert info["kind"] == "model" and info["tensor_count"] == 6 and info["ckptio_manifest"]
    passed, problems = verify_checkpoint(local)
    assert problems == [] and any("checksum match the manifest" in line for line in passed)

    run = tmp_path / "synced" / "run"
    model2 = make_model(3)
    opt2 = torch.optim.Adam(model2.parameters())
    b2 = Booster()
    b2.boost(model2, opt2)
    assert load_checkpoint(run / "epoch-0_step-5", b2, model2, opt2, None, verify=True) == (0, 5, 20)
    assert same(model2, good)
    assert inspect_checkpoint(run)["checkpoints"][0]["state"] == "epoch 0, step 5"
    assert verify_checkpoint(run)[1] == [] and verify_checkpoint(run / "epoch-0_step-5")[1] == []

    booster.save_model(newer, local, shard=True, use_safetensors=True)  # a local save replaces the synced one
    assert not (local / COMMIT_MARKER).exists() and not any(p.name in versions for p in local.iterdir())
    booster.load_model(dest, local)
    assert same(dest, newer)

    (run / "epoch-0_step-5" / COMMIT_MARKER).unlink()  # versions but no marker: an interrupted upload, refused
    with pytest.raises(CheckpointNotFoundError, match="incomplete checkpoint"):
        load_checkpoint(run / "epoch-0_step-5", b2, model2, opt2, None)
