"""Unchanged bytes are not rewritten: a checkpoint links the files of the previous one whose
content did not change, and every checkpoint stays a complete, ordinary folder."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tests.helpers import tiny_llama

from ckptio import Booster, CheckpointManager
from ckptio.formats.naming import MANIFEST
from ckptio.tools import verify_checkpoint
from ckptio.training import load_checkpoint, save_checkpoint

BATCHES = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(4)]
SHARD_MIB = 0.02  # several shards of the tiny model, so frozen and trained tensors can part


def _is_frozen(name: str) -> bool:
    return name.startswith("model.embed_tokens") or ".layers.0." in name


def _job():
    model = tiny_llama(seed=0)
    for name, param in model.named_parameters():
        param.requires_grad_(not _is_frozen(name))
    booster = Booster()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer, *_ = booster.boost(model, optimizer)
    return booster, model, optimizer


def _step(model, optimizer, batch) -> None:
    loss = model(batch, labels=batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _wchar() -> int:
    """Bytes this process handed to write system calls so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def _weights_files(folder: Path, index_name: str) -> dict[str, list[str]]:
    weight_map = json.loads((folder / index_name).read_text())["weight_map"]
    files: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        files.setdefault(name, []).append(key)
    return files


def _header_bytes(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts written bytes with /proc/self/io (Linux)")
def test_frozen_shards_are_linked_from_the_previous_checkpoint_and_only_changed_bytes_are_written(tmp_path):
    booster, model, optimizer = _job()
    paths, written = [], []
    for step, batch in enumerate(BATCHES[:3], start=1):
        _step(model, optimizer, batch)
        before = _wchar()
        use_async = step == 3  # the background save links too
        paths.append(
            save_checkpoint(tmp_path, booster, model, optimizer, None, 0, step, 2, size_per_shard=SHARD_MIB,
                            use_async=use_async)
        )  # fmt: skip
        booster.wait()
        written.append(_wchar() - before)

    files = _weights_files(paths[-1] / "modeling", "model.safetensors.index.json")
    frozen = {name for name, keys in files.items() if all(_is_frozen(k) for k in keys)}
    assert frozen and all(not any(_is_frozen(k) for k in keys) for n, keys in files.items() if n not in frozen)
    for name in frozen:  # one inode, three names
        stats = [os.stat(p / "modeling" / name) for p in paths]
        assert len({(s.st_dev, s.st_ino) for s in stats}) == 1 and stats[0].st_nlink == 3
    frozen_bytes = sum(os.path.getsize(paths[-1] / "modeling" / n) for n in frozen)
    for path, nbytes in zip(paths[1:], written[1:]):
        manifest = json.loads((path / MANIFEST).read_text())
        assert manifest["reused"] == {"files": len(frozen), "bytes": frozen_bytes}
        # what changed: the trained parameters and the optimizer's state; the rest is metadata
        changed = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        changed += json.loads((path / "optimizer" / "optimizer.index.json").read_text())["metadata"]["total_size"]
        weights = [n for n in manifest["files"] if n.endswith(".safetensors")]
        metadata = sum(f["size"] for n, f in manifest["files"].items() if n not in weights)
        metadata += sum(_header_bytes(path / n) for n in weights) + len((path / MANIFEST).read_bytes())
        assert nbytes <= changed * 1.01 + metadata, (nbytes, changed, metadata)
        assert nbytes >= changed  # and every changed byte was written
    assert written[0] > written[1] + frozen_bytes * 0.99  # the first save had nothing to link

    for path in paths:  # each one a whole, ordinary folder
        passed, problems = verify_checkpoint(path)
        assert problems == [], problems
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(paths[-1] / "modeling")
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in model.state_dict().items())
    copied = shutil.copytree(paths[-1], tmp_path / "copy")  # a plain copy: bytes, not links
    assert verify_checkpoint(copied)[1] == [] and os.stat(copied / "modeling" / sorted(frozen)[0]).st_nlink == 1


def test_a_frozen_tensor_changed_behind_autograd_is_written_not_linked(tmp_path):
    booster, model, optimizer = _job()
    first = save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 1, 2, size_per_shard=SHARD_MIB)
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.data[0, 0] += 1.0  # .data: no version counter moves; only the bytes tell
    second = save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 2, 2, size_per_shard=SHARD_MIB)
    name = json.loads((second / "modeling" / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.0.mlp.up_proj.weight"
    ]
    a, b = os.stat(first / "modeling" / name), os.stat(second / "modeling" / name)
    assert a.st_ino != b.st_ino and b.st_nlink == 1
    fresh = tiny_llama(seed=3)
    Booster().load_model(fresh, second, verify=True)
    assert torch.equal(fresh.model.layers[0].mlp.up_proj.weight, frozen.detach())
    Booster().load_model(fresh, first, verify=True)  # the earlier checkpoint kept its own bytes
    assert not torch.equal(fresh.model.layers[0].mlp.up_proj.weight, frozen.detach())


def test_rotation_never_breaks_the_checkpoint_it_keeps(tmp_path):
    booster, model, optimizer = _job()
    manager = CheckpointManager(tmp_path, booster, keep_last=1)
    for step, batch in enumerate(BATCHES[:3], start=1):
        _step(model, optimizer, batch)
        manager.save(model, optimizer, None, 0, step, 2, size_per_shard=SHARD_MIB)
    (kept,) = sorted(tmp_path.iterdir())
    assert kept.name == "epoch-0_step-3" and json.loads((kept / MANIFEST).read_text())["reused"]["files"] > 0
    assert all(os.stat(p).st_nlink == 1 for p in (kept / "modeling").iterdir())  # the other names are gone
    assert verify_checkpoint(kept)[1] == []
    booster2, model2, optimizer2 = _job()
    load_checkpoint(kept, booster2, model2, optimizer2, None, verify=True)
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in model.state_dict().items())


def test_files_are_written_where_a_link_cannot_be_made(tmp_path, monkeypatch):
    booster, model, optimizer = _job()
    booster.save_model(model, tmp_path / "m", shard=True, use_safetensors=True, size_per_shard=SHARD_MIB)

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)  # e.g. the previous checkpoint on another filesystem
    booster.save_model(model, tmp_path / "m", shard=True, use_safetensors=True, size_per_shard=SHARD_MIB)
    assert "reused" not in json.loads((tmp_path / "m" / MANIFEST).read_text())
    monkeypatch.undo()
    assert verify_checkpoint(tmp_path / "m")[1] == []
    # with links: a re-save of the same folder links its own frozen shards
    booster.save_model(model, tmp_path / "m", shard=True, use_safetensors=True, size_per_shard=SHARD_MIB)
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    files = _weights_files(tmp_path / "m", "model.safetensors.index.json")
    assert manifest["reused"]["files"] == sum(all(_is_frozen(k) for k in keys) for keys in files.values()) > 0
    fresh = tiny_llama(seed=3)
    Booster().load_model(fresh, tmp_path / "m", verify=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
