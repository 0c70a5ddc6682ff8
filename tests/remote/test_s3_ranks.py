"""s3:// from every rank (a real S3 server on 127.0.0.1): each rank uploads its files, the marker is
written once all succeeded, loads at any world size read only each rank's byte ranges, and a rank
killed mid-upload leaves nothing visible."""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ckptio import Booster
from ckptio.formats.naming import COMMIT_MARKER
from ckptio.plugins import TorchDDPPlugin, TorchFSDPPlugin
from ckptio.storage import fsspec_storage, reading
from tests.dist.faults import wrap_writes
from tests.dist.harness import run_ranks
from tests.dist.models import diff_keys, full_state, make_uneven

pytestmark = pytest.mark.dist


def _booster(plugin: str) -> Booster:
    return Booster(plugin=TorchFSDPPlugin(shard_classes={"Block"}) if plugin == "fsdp" else TorchDDPPlugin())


def _model(seed: int) -> nn.Module:
    """Big enough (about 0.4 MB) that each rank's share of the bytes dwarfs the file headers."""
    model = make_uneven(seed)
    torch.manual_seed(seed)
    model.wide = nn.Linear(320, 320)
    return model


def _save(url: str, plugin: str, seed: int) -> None:
    booster = _booster(plugin)
    model, *_ = booster.boost(_model(seed))
    booster.save_model(model, url, shard=True, use_safetensors=True, size_per_shard=0.2)


def _load(url: str, plugin: str) -> tuple[list[str], int]:
    booster = _booster(plugin)
    model, *_ = booster.boost(_model(seed=9))
    before = reading.bytes_fetched()
    report = booster.load_model(model, url, verify=False)
    assert report.ok, report.describe()
    state = full_state(model.module if plugin == "ddp" else model)
    return diff_keys(state, _model(seed=0).state_dict()), reading.bytes_fetched() - before


@pytest.mark.parametrize("plugin,saved_on,loaded_on", [("fsdp", 2, (1, 2, 3)), ("ddp", 3, (2,))])
def test_every_rank_uploads_and_loads_read_only_each_ranks_bytes(s3, tmp_path, plugin, saved_on, loaded_on):
    url = f"{s3}/{plugin}/model"
    total = sum(t.numel() * t.element_size() for t in _model(seed=0).state_dict().values())

    def scenario(ctx):
        ctx.phase(saved_on, "save", lambda: _save(url, plugin, 0))
        return {ws: ctx.phase(ws, f"load{ws}", lambda: _load(url, plugin)) for ws in loaded_on}

    results = run_ranks(scenario, max(saved_on, *loaded_on), tmp_path)
    fs, root = fsspec_storage.filesystem(url)
    fs.invalidate_cache()
    version = fsspec_storage.read_marker(fs, root)
    files = [p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/{version}")]
    assert sum(f.endswith(".safetensors") for f in files) >= 2
    for ws in loaded_on:
        per_rank = [results[r][ws] for r in range(ws)]
        assert all(bad == [] for bad, _ in per_rank), per_rank
        fetched = [n for _, n in per_rank]
        if plugin == "fsdp":
            # each rank fetched only its boxes' byte ranges (plus the headers), not every file
            assert all(n < 1.05 * total / ws for n in fetched), (fetched, total)
        if plugin == "ddp":
            assert sum(fetched) < 1.5 * total  # replicas read once in all, by one rank each
    plain = _model(seed=5)
    Booster().load_model(plain, url, verify=True)  # one plain process, checksums checked
    assert diff_keys(plain.state_dict(), _model(seed=0).state_dict()) == []


COLLECTIVE_TIMEOUT = 30


def _worker(rank: int, workdir, url: str, results) -> None:
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{workdir / 'rendezvous'}", rank=rank, world_size=2,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT),
        )  # fmt: skip
        _save(url, "fsdp", seed=0)
        dist.barrier()
        if rank == 1:  # uploads a file of the new save, then dies
            wrap_writes(after=lambda: os.kill(os.getpid(), signal.SIGKILL))
        try:
            _save(url, "fsdp", seed=1)
        except Exception as exc:  # noqa: BLE001 (reported to the parent, which judges it)
            results.put((rank, "error", f"{type(exc).__name__}: {exc}"[:2000]))
        else:
            results.put((rank, "saved", None))
    except BaseException:  # noqa: BLE001
        results.put((rank, "crashed", traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)


def test_a_rank_killed_mid_upload_leaves_the_previous_checkpoint(s3, s3_client, tmp_path):
    """Ranks forked here get s3fs once this process has used obstore (s3_client.py says why)."""
    url = f"{s3}/killed/model"
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, tmp_path, url, results)) for r in range(2)]
    for p in procs:
        p.start()
    report = None
    deadline = time.monotonic() + COLLECTIVE_TIMEOUT + 60
    try:
        while report is None and time.monotonic() < deadline:
            try:
                rank, kind, value = results.get(timeout=0.5)
            except queue.Empty:
                continue
            assert rank == 0, f"the killed rank {rank} reported {kind}: {value}"
            report = (kind, value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    assert procs[1].exitcode == -signal.SIGKILL
    assert report is not None and report[0] == "error", report
    assert "lost contact with another rank" in report[1], report
    fs, root = fsspec_storage.filesystem(url)
    fs.invalidate_cache()
    assert COMMIT_MARKER in [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    plain = _model(seed=5)
    Booster().load_model(plain, url, verify=True)  # the first save, whole
    assert diff_keys(plain.state_dict(), _model(seed=0).state_dict()) == []
    # the next save removes what the dead one uploaded
    Booster().save_model(_model(seed=2), url, shard=True, use_safetensors=True)
    fs.invalidate_cache()
    versions = [p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith("ckptio-v-")]
    assert len(versions) == 1
