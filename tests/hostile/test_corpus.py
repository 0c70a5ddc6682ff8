"""A corpus of broken and hostile checkpoints: every one is refused with a ``CheckpointError``
that names the offending file, nothing in it runs, and the live objects keep their values
whenever the problem is found before any tensor is copied.

Each case starts from a good checkpoint written by ckptio (so the damage is the only thing
wrong with it) and applies one kind of damage a user meets in practice: a copy cut short,
a file lost, a hand-edited index, a file from an attacker.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ckptio import Booster, CheckpointError
from ckptio.training import StatefulDistributedSampler, load_checkpoint, save_checkpoint
from tests.helpers import MLPWithBuffers, randomize


class _RunsCode:
    """Pickles into a call of ``os.mkdir(marker)``: loading it unsafely would create the marker."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# ----------------------------------------------------------------------------- good checkpoints


def _model() -> torch.nn.Module:
    return randomize(MLPWithBuffers(), 3)


def _trained():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(8, 16)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    return model, optimizer, scheduler


def sharded_model(root: Path, *, safetensors: bool = True) -> Path:
    folder = root / "model"
    Booster().save_model(_model(), folder, shard=True, use_safetensors=safetensors, size_per_shard=0.001)
    return folder


def single_file(root: Path, name: str) -> Path:
    path = root / name
    Booster().save_model(_model(), path, use_safetensors=name.endswith(".safetensors"))
    return path


def sharded_optimizer(root: Path) -> Path:
    model, optimizer, _ = _trained()
    Booster().save_optimizer(optimizer, root / "optim", shard=True, size_per_shard=0.001)
    return root / "optim"


def _sampler():
    dataset = torch.utils.data.TensorDataset(torch.arange(40))
    return StatefulDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)


def training_checkpoint(root: Path) -> Path:
    model, optimizer, scheduler = _trained()
    booster = Booster()
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    return Path(save_checkpoint(root, booster, model, optimizer, scheduler, 1, 4, 8, None, sampler=_sampler()))


def shards(folder: Path, suffix: str = ".safetensors") -> list[Path]:
    return sorted(p for p in folder.iterdir() if "-of-" in p.name and p.name.endswith(suffix))


# ----------------------------------------------------------------------------- loaders


def load_model(path: Path, **kwargs) -> None:
    """Load into a live model; if the load is refused, the model must still hold its own values."""
    live = randomize(MLPWithBuffers(), 11)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    try:
        Booster().load_model(live, path, **kwargs)
    except CheckpointError:
        changed = [k for k, v in live.state_dict().items() if not torch.equal(v, before[k])]
        assert not changed, f"a refused load changed the live model: {changed}"
        raise


def _optimizer_snapshot(optimizer) -> list:
    state = [(k, v.clone()) for s in optimizer.state.values() for k, v in s.items()]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return [state, groups]


def load_optimizer(path: Path, **kwargs) -> None:
    """Load into a live optimizer; if the load is refused, its state and hyper-parameters stay."""
    _, optimizer, _ = _trained()
    before = _optimizer_snapshot(optimizer)
    try:
        Booster().load_optimizer(optimizer, path, **kwargs)
    except CheckpointError:
        after = _optimizer_snapshot(optimizer)
        assert after[1] == before[1], "a refused load changed the param groups"
        assert [k for k, _ in after[0]] == [k for k, _ in before[0]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(after[0], before[0])), "a refused load changed state"
        raise


def load_scheduler(path: Path) -> None:
    _, _, scheduler = _trained()
    Booster().load_lr_scheduler(scheduler, path)


def load_training(path: Path, **kwargs) -> None:
    model, optimizer, scheduler = _trained()
    booster = Booster()
    model, optimizer, _, _, scheduler = booster.boost(model, optimizer, lr_scheduler=scheduler)
    load_checkpoint(path, booster, model, optimizer, scheduler, sampler=_sampler(), **kwargs)


def load_scheduler_of_another_kind(path: Path) -> None:
    _, optimizer, _ = _trained()
    Booster().load_lr_scheduler(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10), path)


# ----------------------------------------------------------------------------- damage


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x55
    path.write_bytes(bytes(data))


def drop_manifest(folder: Path) -> None:
    (folder / "ckptio_manifest.json").unlink()


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))


def point_first_entry_at(index: Path, target: str) -> None:
    def change(data):
        first = next(iter(data["weight_map"]))
        data["weight_map"][first] = target

    edit_json(index, change)


def rewrite_header(path: Path, change: Callable[[dict], None]) -> None:
    """Edit the header of a real safetensors file, keeping its data bytes."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def second_tensor(header: dict) -> dict:
    return header[[k for k in header if k != "__metadata__"][1]]


def sparse_file(path: Path, size: int) -> None:
    """A file that claims ``size`` bytes without using the disk (the size check must refuse it unread)."""
    with open(path, "wb") as fh:
        fh.truncate(size)


def evil_pickle(path: Path, marker: Path, wrap: Callable[[object], object] = lambda evil: {"fc1.weight": evil}) -> None:
    torch.save(wrap(_RunsCode(str(marker))), path)


# ----------------------------------------------------------------------------- the corpus


@dataclass
class Case:
    """``make(root, marker)`` writes the bad checkpoint and returns (what to load, file the error must name)."""

    id: str
    make: Callable[[Path, Path], tuple[Path, str]]
    load: Callable[..., None]
    load_kwargs: dict | None = None


def _shard_damage(damage, *, manifest: bool = True, index: int = 0, safetensors: bool = True):
    def make(root, marker):
        folder = sharded_model(root, safetensors=safetensors)
        if not manifest:
            drop_manifest(folder)
        victim = shards(folder, ".safetensors" if safetensors else ".bin")[index]
        damage(victim)
        return folder, victim.name

    return make


def _index_damage(change, culprit="model.safetensors.index.json"):
    def make(root, marker):
        folder = sharded_model(root)
        drop_manifest(folder)  # only the index is in play
        change(folder / "model.safetensors.index.json")
        return folder, culprit

    return make


def _single_header(header_change):
    def make(root, marker):
        path = single_file(root, "model.safetensors")
        rewrite_header(path, header_change)
        return path, path.name

    return make


def _set(key, value):
    def change(entry_or_header):
        entry_or_header[key] = value

    return change


def _bin_shard_with_code(root, marker):
    folder = sharded_model(root, safetensors=False)
    drop_manifest(folder)
    victim = shards(folder, ".bin")[0]
    evil_pickle(victim, marker)
    return folder, victim.name


def _single_bin_with_code(root, marker):
    path = root / "model.bin"
    evil_pickle(path, marker)
    return path, path.name


def _optimizer_file_with_code(root, marker):
    path = root / "optimizer.bin"
    evil_pickle(path, marker, lambda evil: {"state": {0: {"exp_avg": evil}}, "param_groups": []})
    return path, path.name


def _scheduler_with_code(root, marker):
    path = root / "lr_scheduler.pt"
    evil_pickle(path, marker, lambda evil: {"step_size": evil})
    return path, path.name


def _step_lr_file(root):
    _, _, scheduler = _trained()
    path = root / "lr_scheduler"
    Booster().save_lr_scheduler(scheduler, path)
    return path, path.name


def _scheduler_bad_json(root, marker):
    path = root / "lr_scheduler"
    path.write_text('{"step_size": 2, "last_epoch": ')
    return path, path.name


def _wrong_dtype(root, marker):
    state = _model().state_dict()
    state["fc1.weight"] = state["fc1.weight"].to(torch.int32)  # float64 would be cast; integers into floats never
    path = root / "model.bin"
    torch.save(state, path)
    return path, path.name


def _wrong_shape(root, marker):
    folder = sharded_model(root)
    drop_manifest(folder)
    victim = shards(folder)[0]

    def transpose(header):
        entry = first_tensor(header)
        if len(entry["shape"]) == 2:
            entry["shape"] = entry["shape"][::-1]
        else:
            entry["shape"] = [1, *entry["shape"]]

    rewrite_header(victim, transpose)  # same byte count: only the claimed shape changes
    return folder, victim.name


def _optimizer_shard_damage(damage):
    def make(root, marker):
        folder = sharded_optimizer(root)
        victim = shards(folder)[0]
        damage(victim)
        return folder, victim.name

    return make


def _optimizer_index_damage(change):
    def make(root, marker):
        folder = sharded_optimizer(root)
        drop_manifest(folder)
        index = next(p for p in folder.iterdir() if p.name.endswith(".index.json"))
        change(index)
        return folder, index.name

    return make


def _training_damage(relative, damage, *, manifest: bool = True):
    def make(root, marker):
        folder = training_checkpoint(root)
        if not manifest:
            drop_manifest(folder)  # the file's own parser must catch it
        damage(folder / relative)
        return folder, Path(relative).name

    return make


def _deep_json(path: Path) -> None:
    path.write_text("[" * 200_000 + "]" * 200_000)


def _missing(path: Path) -> None:
    path.unlink()


def _deep_header(root: Path) -> tuple[Path, str]:
    path = root / "model.safetensors"
    raw = b"[" * 200_000 + b"]" * 200_000
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path, path.name


def _huge_header_length(root: Path) -> tuple[Path, str]:
    path = root / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    return path, path.name


def _zero_single(root: Path, name: str) -> tuple[Path, str]:
    path = root / name
    path.write_bytes(b"")
    return path, path.name


def _truncated_single(root: Path, name: str) -> tuple[Path, str]:
    path = single_file(root, name)
    truncate(path)
    return path, path.name


def _bin_holding(root: Path, obj: object) -> tuple[Path, str]:
    path = root / "model.bin"
    torch.save(obj, path)
    return path, path.name


def _header_length_beyond_file(root: Path, marker: Path) -> tuple[Path, str]:
    path = root / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 4096) + b'{"a": {}}')
    return path, path.name


CORPUS = [
    # -- model shards
    Case("shard-truncated", _shard_damage(truncate), load_model),
    Case("shard-truncated-no-manifest", _shard_damage(truncate, manifest=False), load_model),
    Case("shard-zero-bytes", _shard_damage(lambda p: truncate(p, 0)), load_model),
    Case("shard-zero-bytes-no-manifest", _shard_damage(lambda p: truncate(p, 0), manifest=False), load_model),
    Case("shard-missing", _shard_damage(_missing, index=1), load_model),
    Case("shard-missing-no-manifest", _shard_damage(_missing, manifest=False, index=1), load_model),
    Case("shard-checksum", _shard_damage(flip_last_byte), load_model, {"verify": True}),
    Case("bin-shard-truncated", _shard_damage(truncate, manifest=False, safetensors=False), load_model),
    Case("bin-shard-runs-code", _bin_shard_with_code, load_model),
    # -- the index
    Case("index-parent-path", _index_damage(lambda p: point_first_entry_at(p, "../outside.safetensors")), load_model),
    Case("index-absolute-path", _index_damage(lambda p: point_first_entry_at(p, "/etc/passwd")), load_model),
    Case("index-sneaky-path", _index_damage(lambda p: point_first_entry_at(p, "a/../../x.safetensors")), load_model),
    Case("index-malformed", _index_damage(lambda p: p.write_text('{"weight_map": {"a": ')), load_model),
    Case("index-not-utf8", _index_damage(lambda p: p.write_bytes(b'{"weight_map": "\xff\xfe"}')), load_model),
    Case("index-deeply-nested", _index_damage(_deep_json), load_model),
    Case("index-huge", _index_damage(lambda p: sparse_file(p, 300 * 1024 * 1024)), load_model),
    Case("index-weight-map-list", _index_damage(lambda p: edit_json(p, _set("weight_map", ["a"]))), load_model),
    Case("index-shard-name-int", _index_damage(lambda p: point_first_entry_at(p, 7)), load_model),
    Case("index-not-an-object", _index_damage(lambda p: p.write_text("[1, 2]")), load_model),
    Case(
        "index-total-size-string",
        _index_damage(lambda p: edit_json(p, lambda d: d["metadata"].__setitem__("total_size", "big"))),
        load_model,
    ),
    Case(
        "index-names-missing-file",
        _index_damage(lambda p: point_first_entry_at(p, "nowhere.safetensors"), "nowhere.safetensors"),
        load_model,
    ),
    # -- safetensors headers
    Case(
        "header-offsets-beyond-file",
        _single_header(lambda h: _set("data_offsets", [0, 10**9])(first_tensor(h))),
        load_model,
    ),
    Case(
        "header-offsets-overlap",
        _single_header(lambda h: second_tensor(h).__setitem__("data_offsets", first_tensor(h)["data_offsets"])),
        load_model,
    ),
    Case(
        "header-offsets-negative", _single_header(lambda h: _set("data_offsets", [-8, 0])(first_tensor(h))), load_model
    ),
    Case(
        "header-offsets-reversed",
        _single_header(lambda h: first_tensor(h).__setitem__("data_offsets", first_tensor(h)["data_offsets"][::-1])),
        load_model,
    ),
    Case("header-shape-lies", _single_header(lambda h: _set("shape", [10**12, 10**12])(first_tensor(h))), load_model),
    Case("header-unknown-dtype", _single_header(lambda h: _set("dtype", "Q128")(first_tensor(h))), load_model),
    Case("header-entry-not-object", _single_header(lambda h: h.__setitem__("fc1.weight", [1, 2])), load_model),
    Case("header-length-beyond-file", _header_length_beyond_file, load_model),
    Case("header-deeply-nested", lambda root, marker: _deep_header(root), load_model),
    Case("header-length-huge", lambda root, marker: _huge_header_length(root), load_model),
    Case("safetensors-zero-bytes", lambda root, marker: _zero_single(root, "model.safetensors"), load_model),
    # -- single files
    Case("bin-runs-code", _single_bin_with_code, load_model),
    Case("bin-truncated", lambda root, marker: _truncated_single(root, "model.bin"), load_model),
    Case("bin-zero-bytes", lambda root, marker: _zero_single(root, "model.bin"), load_model),
    Case("bin-not-a-dict", lambda root, marker: _bin_holding(root, [torch.zeros(2)]), load_model),
    Case("wrong-dtype", _wrong_dtype, load_model),
    Case("wrong-shape", _wrong_shape, load_model),
    # -- optimizer
    Case("optimizer-runs-code", _optimizer_file_with_code, load_optimizer),
    Case("optimizer-shard-truncated", _optimizer_shard_damage(truncate), load_optimizer),
    Case("optimizer-shard-checksum", _optimizer_shard_damage(flip_last_byte), load_optimizer, {"verify": True}),
    Case("optimizer-index-malformed", _optimizer_index_damage(lambda p: p.write_text("{")), load_optimizer),
    Case(
        "optimizer-index-parent-path",
        _optimizer_index_damage(lambda p: point_first_entry_at(p, "../x.safetensors")),
        load_optimizer,
    ),
    Case(
        "optimizer-index-not-an-object", _optimizer_index_damage(lambda p: p.write_text('"optimizer"')), load_optimizer
    ),
    # -- LR scheduler
    Case("scheduler-runs-code", _scheduler_with_code, load_scheduler),
    Case("scheduler-malformed-json", _scheduler_bad_json, load_scheduler),
    # -- training checkpoint
    Case(
        "running-states-malformed", _training_damage("running_states.json", lambda p: p.write_text("{")), load_training
    ),
    Case(
        "running-states-step-missing",
        _training_damage("running_states.json", lambda p: edit_json(p, lambda d: d.pop("step"))),
        load_training,
    ),
    Case(
        "running-states-not-an-object",
        _training_damage("running_states.json", lambda p: p.write_text("[]")),
        load_training,
    ),
    Case("manifest-malformed", _training_damage("ckptio_manifest.json", lambda p: p.write_text("{")), load_training),
    Case(
        "manifest-parent-path",
        _training_damage(
            "ckptio_manifest.json",
            lambda p: edit_json(p, lambda d: d["files"].__setitem__("../escape", next(iter(d["files"].values())))),
        ),
        load_training,
    ),
    Case(
        "training-model-shard-truncated",
        _training_damage("modeling/model-00001-of-00001.safetensors", truncate),
        load_training,
    ),
    Case(
        "training-optimizer-checksum",
        _training_damage("optimizer/optimizer-00001-of-00001.safetensors", flip_last_byte),
        load_training,
        {"verify": True},
    ),
    Case("training-scheduler-malformed", _training_damage("lr_scheduler", lambda p: p.write_text("{")), load_training),
    Case(
        "training-scheduler-not-a-scheduler-state",
        _training_damage("lr_scheduler", lambda p: torch.save({"x": 1}, p), manifest=False),
        load_training,
    ),
    Case(
        "training-sampler-state-bad",
        _training_damage(
            "running_states.json", lambda p: edit_json(p, lambda d: d["sampler"].update(epoch="x")), manifest=False
        ),
        load_training,
    ),
    Case(
        "training-rng-malformed",
        _training_damage("rng_state/rank_00000.json", lambda p: p.write_text("{"), manifest=False),
        load_training,
    ),
    Case(
        "training-rng-not-an-rng-state",
        _training_damage("rng_state/rank_00000.json", lambda p: p.write_text('{"python": 5}'), manifest=False),
        load_training,
    ),
    Case("scheduler-of-another-kind", lambda root, marker: _step_lr_file(root), load_scheduler_of_another_kind),
]


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_bad_checkpoint_is_refused_naming_the_file(tmp_path, case):
    marker = tmp_path / "code-ran"
    root = tmp_path / "ckpt"
    root.mkdir()
    target, culprit = case.make(root, marker)
    with pytest.raises(CheckpointError) as info:
        case.load(target, **(case.load_kwargs or {}))
    assert culprit in str(info.value), f"the error must name {culprit}: {info.value}"
    assert not marker.exists(), "a file in the checkpoint ran code"


def test_corpus_cases_start_from_loadable_checkpoints(tmp_path):
    """The damage is what the corpus tests: the same checkpoints load when left alone."""
    load_model(sharded_model(tmp_path / "a"), verify=True)
    load_model(sharded_model(tmp_path / "b", safetensors=False), verify=True)
    load_model(single_file(tmp_path, "m.safetensors"))
    load_model(single_file(tmp_path, "m.bin"))
    load_optimizer(sharded_optimizer(tmp_path / "c"), verify=True)
    load_training(training_checkpoint(tmp_path / "d"), verify=True)


def test_refused_load_leaves_the_live_model_untouched(tmp_path):
    folder = sharded_model(tmp_path)
    victim = shards(folder)[-1]
    truncate(victim)
    live = randomize(MLPWithBuffers(), 9)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    with pytest.raises(CheckpointError):
        Booster().load_model(live, folder)
    assert all(torch.equal(before[k], v) for k, v in live.state_dict().items())
