"""The ``ckptio`` command on real checkpoints, good and corrupted.

A few calls go through a real subprocess (the installed entry point's module); the rest use
click's in-process runner, which runs the same code without paying torch's import each time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ckptio import Booster
from ckptio.cli import main
from ckptio.formats import colossal_optim  # noqa: F401  (optimizer layout module must import)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def ckpts(tmp_path):
    """A sharded safetensors folder, a single .bin, and the model they hold."""
    model = make_model(0)
    booster = Booster()
    booster.save_model(model, tmp_path / "sharded", shard=True, size_per_shard=0.002, use_safetensors=True)
    booster.save_model(model, tmp_path / "model.bin")
    return tmp_path, model


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def run_process(*args):
    return subprocess.run(
        [sys.executable, "-m", "ckptio.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def loaded(path) -> dict:
    other = make_model(7)
    Booster().load_model(other, str(path))
    return state(other)


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_subprocess_inspect_verify_and_corruption(ckpts):
    tmp, model = ckpts
    out = run_process("inspect", tmp / "sharded", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    params = sum(p.numel() for p in model.parameters())
    assert info["tensor_count"] == 6 and info["parameters"] == params and info["format"] == "safetensors"
    assert info["sharded"] and info["index"] == "model.safetensors.index.json" and info["ckptio_manifest"]
    assert info["tensor_bytes"] == params * 4 and info["dtypes"] == {"float32": 6}
    assert sum(f["tensors"] for f in info["files"]) == 6 and len(info["files"]) >= 2

    out = run_process("verify", tmp / "sharded")
    assert out.returncode == 0 and out.stdout.rstrip().endswith("OK"), out.stdout + out.stderr

    shard = sorted((tmp / "sharded").glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size, different bytes: only the checksum can tell
    shard.write_bytes(bytes(data))
    out = run_process("verify", tmp / "sharded")
    assert out.returncode == 1
    assert f"FAIL  {shard.name}: xxh3-128 checksum differs" in out.stdout
    code, text = cli("verify", tmp / "sharded", "--no-checksums")
    assert code == 0, text

    out = run_process("inspect", tmp / "does-not-exist")
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "no such file" in out.stderr


def test_subprocess_help_names_every_command():
    out = run_process("--help")
    assert out.returncode == 0
    for command in ("inspect", "verify", "convert", "diff"):
        assert command in out.stdout
    code, _ = cli("bogus")
    assert code == 2


def test_inspect_text_and_tensors(ckpts):
    tmp, _ = ckpts
    code, text = cli("inspect", tmp / "model.bin", "--tensors")
    assert code == 0
    assert "format       torch, single file" in text
    assert "0.weight  float32  [32, 16]  model.bin" in text
    code, text = cli("inspect", tmp / "sharded")
    assert code == 0 and "sharded (model.safetensors.index.json" in text and "parameters   740" in text


def test_verify_truncated_missing_and_index_problems(ckpts):
    tmp, _ = ckpts
    folder = tmp / "sharded"
    shards = sorted(folder.glob("model-*.safetensors"))

    broken = tmp / "truncated"
    shutil.copytree(folder, broken)
    with open(broken / shards[0].name, "r+b") as fh:
        fh.truncate(100)
    code, text = cli("verify", broken)
    assert code == 1 and "size 100 bytes, manifest says" in text

    gone = tmp / "missing"
    shutil.copytree(folder, gone)
    (gone / shards[-1].name).unlink()
    code, text = cli("verify", gone)
    assert code == 1 and "missing" in text

    # A folder written by another tool (no manifest) whose index names a tensor its shard lacks.
    foreign = tmp / "foreign"
    shutil.copytree(folder, foreign)
    (foreign / "ckptio_manifest.json").unlink()
    index = json.loads((foreign / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = shards[0].name
    (foreign / "model.safetensors.index.json").write_text(json.dumps(index))
    code, text = cli("verify", foreign)
    assert code == 1 and "1 index entries not in their shard" in text and "ghost.weight" in text

    # A header that lies (garbage instead of JSON) is refused even with --no-checksums.
    garbage = tmp / "garbage"
    shutil.copytree(folder, garbage)
    target = garbage / shards[0].name
    target.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + target.read_bytes()[24:])
    code, text = cli("verify", garbage, "--no-checksums")
    assert code == 1 and f"FAIL  {shards[0].name}" in text


def test_convert_every_direction_round_trips(ckpts):
    tmp, model = ckpts
    want = state(model)
    # sharded safetensors -> one safetensors file (consolidate)
    code, _ = cli("convert", tmp / "sharded", tmp / "one.safetensors", "-q")
    assert code == 0
    assert_state_equal(loaded(tmp / "one.safetensors"), want)
    # one .bin -> sharded .bin folder (re-shard), with index
    code, _ = cli("convert", tmp / "model.bin", tmp / "bin-shards", "--format", "bin", "--size-per-shard", 0.001, "-q")
    assert code == 0
    assert (tmp / "bin-shards" / "pytorch_model.bin.index.json").is_file()
    assert len(list((tmp / "bin-shards").glob("pytorch_model-*.bin"))) >= 2
    assert_state_equal(loaded(tmp / "bin-shards"), want)
    # sharded .bin -> one .bin file
    code, _ = cli("convert", tmp / "bin-shards", tmp / "again.bin", "-q")
    assert code == 0
    assert_state_equal(loaded(tmp / "again.bin"), want)
    # the result is a plain torch file that torch itself reads safely
    plain = torch.load(tmp / "again.bin", weights_only=True)
    assert_state_equal(plain, want)
    # the converted folder verifies
    code, _ = cli("verify", tmp / "bin-shards")
    assert code == 0


def test_convert_colossalai_layout_to_hf(tmp_path):
    """ColossalAI's sharded .bin layout (prefix, no manifest) -> an HF safetensors folder."""
    model = make_model(3)
    want = state(model)
    src = tmp_path / "colossal"
    Booster().save_model(model, src, shard=True, size_per_shard=0.002, prefix="ema")
    (src / "ckptio_manifest.json").unlink()
    (src / "config.json").write_text('{"model_type": "toy"}')
    assert (src / "pytorch_model.bin.index.ema.json").is_file()
    code, _ = cli("convert", src, tmp_path / "hf", "-q")
    assert code == 0, _
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "hf" / "config.json").read_text() == '{"model_type": "toy"}'
    assert_state_equal(loaded(tmp_path / "hf"), want)
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

    assert SAFE_WEIGHTS_INDEX_NAME == "model.safetensors.index.json"


def test_convert_bad_input(ckpts):
    tmp, _ = ckpts
    code, text = cli("convert", tmp / "sharded", tmp / "model.bin")
    assert code == 2 and "already exists" in text
    code, text = cli("convert", tmp / "nothing", tmp / "x.safetensors")
    assert code == 2 and "no such file" in text
    (tmp / "empty").mkdir()
    code, text = cli("convert", tmp / "empty", tmp / "x.safetensors")
    assert code == 2 and "no checkpoint here" in text
    code, _ = cli("convert", tmp / "sharded", tmp / "y", "--size-per-shard", 0)
    assert code == 2
    assert not (tmp / "x.safetensors").exists() and not (tmp / "y").exists()


def test_diff_equal_different_and_atol(ckpts):
    tmp, model = ckpts
    code, text = cli("diff", tmp / "sharded", tmp / "model.bin")
    assert code == 0 and "EQUAL" in text

    changed = make_model(0)
    with torch.no_grad():
        changed[0].weight[0, 0] += 0.25
    Booster().save_model(changed, tmp / "changed.safetensors")
    code, text = cli("diff", tmp / "sharded", tmp / "changed.safetensors")
    assert code == 1 and "differs     0.weight: max |a-b| = 0.25" in text
    code, _ = cli("diff", tmp / "sharded", tmp / "changed.safetensors", "--atol", 0.3)
    assert code == 0

    extra = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4), nn.Linear(4, 2))
    extra.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        extra[1].weight.data = torch.ones(32, dtype=torch.float64)
    Booster().save_model(extra, tmp / "extra.safetensors")
    code, text = cli("diff", tmp / "model.bin", tmp / "extra.safetensors", "--json")
    report = json.loads(text)
    assert code == 1 and not report["equal"]
    assert report["only_in_b"] == ["3.bias", "3.weight"] and report["only_in_a"] == []
    assert report["mismatched"] == [{"name": "1.weight", "a": "float32[32]", "b": "float64[32]"}]


@pytest.mark.parametrize("layout", ["ckptio", "colossalai"])
def test_optimizer_inspect_and_verify(tmp_path, layout):
    model = make_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    booster.checkpoint_io.optimizer_layout = layout
    booster.save_optimizer(optimizer, tmp_path / "optim", shard=True)
    code, text = cli("inspect", tmp_path / "optim", "--json")
    info = json.loads(text)
    assert code == 0 and info["kind"] == "optimizer" and info["layout"] == layout and info["ckptio_manifest"]
    code, text = cli("verify", tmp_path / "optim")
    assert code == 0 and text.rstrip().endswith("OK"), text
    shard = next(p for p in (tmp_path / "optim").iterdir() if "-0000" in p.name)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, text = cli("verify", tmp_path / "optim")
    assert code == 1 and "checksum differs" in text


def _training_run(folder, steps=(5, 10)):
    from ckptio import CheckpointManager

    model = make_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    manager = CheckpointManager(folder, booster, keep_last=None)
    for step in steps:
        manager.save(model, optimizer, scheduler, 0, step, 4)
    return model


def test_training_checkpoint_inspect_and_verify(tmp_path):
    """A training checkpoint and a run's folder of them are checked whole: every file of every
    part against the one manifest, then each part parsed as loading would."""
    model = _training_run(tmp_path / "run")
    ckpt = tmp_path / "run" / "epoch-0_step-10"
    code, text = cli("inspect", ckpt, "--json")
    info = json.loads(text)
    assert code == 0 and info["kind"] == "training"
    assert info["running_states"]["step"] == 10 and info["running_states"]["sample_start_index"] == 40
    assert info["model"]["tensor_count"] == len(model.state_dict()) and info["model"]["ckptio_manifest"]
    assert info["optimizer"]["layout"] == "ckptio"
    code, text = cli("inspect", tmp_path / "run")
    assert code == 0 and "2 training checkpoint(s)" in text and "epoch 0, step 10" in text
    code, text = cli("verify", ckpt)
    assert code == 0 and text.rstrip().endswith("OK"), text
    assert "optimizer/optimizer.index.json: size and checksum match" in text and "lr_scheduler: readable" in text
    code, text = cli("verify", tmp_path / "run", "-q")
    assert code == 0 and text.strip() == f"{tmp_path / 'run'}: OK", text

    (tmp_path / "run" / ".epoch-0_step-15.ckptio-tmp-0123456789ab").mkdir()  # a crashed save: not a failure
    shard = next((ckpt / "optimizer").glob("optimizer-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    (tmp_path / "run" / "epoch-0_step-5" / "running_states.json").write_text('{"epoch": 0}')
    code, text = cli("verify", tmp_path / "run")
    assert code == 1, text
    assert "FAIL  epoch-0_step-10/optimizer/optimizer-00001-of-00001.safetensors: xxh3-128 checksum differs" in text
    assert "FAIL  epoch-0_step-5/running_states.json: step, sample_start_index missing or not an integer" in text
    assert "1 unfinished save(s) left by a crash, ignored" in text


def test_training_checkpoint_model_loads_converts_and_diffs(tmp_path):
    """The model part of a training checkpoint is found from the checkpoint folder itself."""
    model = _training_run(tmp_path / "run")
    ckpt = tmp_path / "run" / "epoch-0_step-10"
    assert_state_equal(loaded(ckpt), state(model))  # Booster.load_model(model, "epoch-E_step-S")
    code, text = cli("convert", ckpt, tmp_path / "exported.safetensors")
    assert code == 0, text
    assert_state_equal(loaded(tmp_path / "exported.safetensors"), state(model))
    code, text = cli("diff", tmp_path / "run" / "epoch-0_step-5", ckpt)
    assert code == 0 and text.rstrip().endswith("EQUAL"), text


def test_progress_only_on_a_master_terminal(monkeypatch):
    from ckptio import progress

    class Tty:
        def isatty(self):
            return True

        def write(self, s):
            return len(s)

        def flush(self):
            pass

    monkeypatch.delenv("CKPTIO_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not progress.progress_enabled()  # pytest's captured stderr is not a terminal
    monkeypatch.setattr(progress.sys, "stderr", Tty())
    assert progress.progress_enabled()
    assert not progress.progress_enabled(quiet=True)
    with progress.Progress("x", 100, 2) as bar:
        assert bar._bar is not None
        bar.advance(50)
        bar.file_done()
        assert bar._bar.n == 50 and bar.files == 1
    monkeypatch.setenv("RANK", "1")
    assert not progress.progress_enabled()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("CKPTIO_PROGRESS", "0")
    assert progress.Progress("x", 1, 1)._bar is None


@pytest.mark.parametrize("how", ["torch.save", "save_optimizer"])
def test_single_file_optimizer_inspect_verify_and_convert_refused(tmp_path, how):
    model = make_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    booster = Booster()
    model, optimizer, *_ = booster.boost(model, optimizer)
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    path = tmp_path / "optim.bin"
    if how == "torch.save":
        torch.save(optimizer.state_dict(), path)
    else:
        booster.save_optimizer(optimizer, path, shard=False)
    code, text = cli("inspect", path, "--json")
    info = json.loads(text)
    assert code == 0 and info["kind"] == "optimizer" and info["layout"] == "torch", text
    code, text = cli("verify", path)
    assert code == 0 and "optim.bin: torch layout readable" in text and text.rstrip().endswith("OK"), text
    booster.save_optimizer(optimizer, tmp_path / "optim_dir", shard=True)
    for src in (path, tmp_path / "optim_dir"):
        code, text = cli("convert", src, tmp_path / "out.safetensors")
        assert code == 2 and "holds an optimizer, not model weights" in text, text
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_empty_or_unrelated_folder_is_no_checkpoint_for_every_command(tmp_path, command):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "notes.txt").write_text("nothing to see")
    for folder in ("empty", "unrelated"):
        code, text = cli(command, tmp_path / folder)
        assert code == 2 and f"{tmp_path / folder}: no checkpoint here" in text, text


def _json_error(*args) -> dict:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert result.stderr == "", "with --json nothing but the JSON object is printed"
    body = json.loads(result.stdout)
    assert set(body) == {"error", "path"}, body
    return body


def test_json_errors_are_one_json_object_on_stdout_for_every_command(ckpts):
    tmp, _ = ckpts
    (tmp / "empty").mkdir()
    missing, empty = str(tmp / "missing"), str(tmp / "empty")
    for args in (
        ("inspect", missing),
        ("verify", missing),
        ("diff", tmp / "sharded", missing),
        ("convert", missing, tmp / "x.safetensors"),
    ):
        body = _json_error(*args, "--json")
        assert body == {"error": f"{missing}: no such file or folder", "path": missing}
    for command in ("inspect", "verify"):
        body = _json_error(command, empty, "--json")
        assert body["path"] == empty and "no checkpoint here" in body["error"]
    body = _json_error("convert", tmp / "sharded", tmp / "model.bin", "--json")
    assert body["path"] == str(tmp / "model.bin") and "already exists" in body["error"]
    body = _json_error("verify", "--json")  # a usage error, before any path
    assert body == {"error": "Missing argument 'PATH'.", "path": None}
    code, text = cli("convert", tmp / "sharded", tmp / "one.safetensors", "--json")
    assert code == 0 and json.loads(text)["tensors"] == 6
