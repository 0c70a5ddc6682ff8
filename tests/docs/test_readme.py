"""Every ```python block of README.md and docs/*.md runs as written and does what its text promises.

Sections run as the README's convention says (its ``##`` blocks in order, in one fresh
session, after the file's first block), each in a fresh namespace in ``tmp_path``: one process
in this one; the multi-rank sections on real gloo ranks (``run_ranks``); the ``s3://`` section
against moto's S3 server on 127.0.0.1; the training section in fresh interpreters, killed with
SIGKILL and resumed, to prove the CheckpointManager loop resumes bit for bit.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.dist.harness import run_ranks
from tests.docs.snippets import ROOT, python_blocks, run_block, run_section, section

import ckptio
from ckptio import Booster, CheckpointManager
from ckptio.storage.manifest import read_manifest
from ckptio.training import load_checkpoint

README = ROOT / "README.md"
MIGRATING = ROOT / "docs" / "migrating_from_colossalai.md"

QUICK_START = "Quick start"
LOAD_OPTIONS = "Load options: dtypes, meta models, `key_map`, tensors without a model"
MANY_RANKS = "Many ranks: DDP and FSDP2"
TWO_DIMENSIONS = "Two dimensions: tensor parallel x FSDP2 (`HybridParallelPlugin`)"
ZERO_GEMINI = "ZeRO and Gemini: `LowLevelZeroPlugin`, `GeminiPlugin`"
TRAINING = "Optimizer, LR scheduler and training checkpoints"
ASYNC = "Async saves and performance"
SMALLER = "Smaller checkpoints: trainable-only, LoRA adapters, unchanged files linked"
REMOTE = "Remote storage: `s3://` and any fsspec URL"
CLI = "Command line: `ckptio inspect | verify | convert | diff`"
FROM_DCP = "From DCP / torchtitan"
SWAP_IMPORTS = "1. Swap the imports"
FROM_TRAINER = "From `transformers.Trainer`"
FROM_ACCELERATE = "From `accelerate`"

# (file, heading) of every section with Python blocks -> the test that runs it
CHECKED = {
    (README, QUICK_START): "test_quick_start",
    (README, LOAD_OPTIONS): "test_load_options",
    (README, MANY_RANKS): "test_many_ranks_on_2_ranks",
    (README, TWO_DIMENSIONS): "test_two_dimensions_on_4_ranks",
    (README, ZERO_GEMINI): "test_zero_and_gemini_on_2_ranks",
    (README, TRAINING): "test_training_section, test_manager_loop_resumes_bit_exact_after_kills",
    (README, ASYNC): "test_async_save",
    (README, SMALLER): "test_smaller_checkpoints",
    (README, REMOTE): "test_remote_storage_on_s3",
    (README, CLI): "test_tools_from_python",
    (README, FROM_DCP): "test_from_dcp",
    (MIGRATING, SWAP_IMPORTS): "test_migration_guide_imports",
    (README, FROM_TRAINER): "test_from_trainer",
    (README, FROM_ACCELERATE): "test_from_accelerate",
}

STEPS_PER_EPOCH, EPOCHS = 4, 3  # the training section's toy job: 32 samples, batches of 8


def _files_with_python_blocks() -> list[Path]:
    return [p for p in [README, *sorted((ROOT / "docs").glob("*.md"))] if python_blocks(p)]


def test_every_python_block_is_run_or_marked_with_a_reason():
    unchecked = []
    for path in _files_with_python_blocks():
        for block in python_blocks(path):
            if block.not_run is not None:
                assert block.not_run, f"{block.where}: a <!-- not run: ... --> marker needs a reason"
            elif (path, block.heading) not in CHECKED:
                unchecked.append(f"{block.where} (under '## {block.heading}')")
    assert not unchecked, (
        "Python blocks that no test runs: add their section to CHECKED in tests/docs/test_readme.py with a "
        "test asserting what the snippet promises, or mark the block <!-- not run: REASON -->:\n" + "\n".join(unchecked)
    )


def _prelude_model() -> torch.nn.Module:
    """The README's tiny model as its first block builds it (seeded: the same weights every time)."""
    namespace: dict = {"__name__": "__main__"}
    run_block(python_blocks(README)[0], namespace)
    return namespace["model"]


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    return other


def _assert_same_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def _full(state: dict) -> dict:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}


# ----------------------------------------------------------------------------- one process


def test_quick_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_section(README, QUICK_START)
    folder = tmp_path / "ckpt" / "model"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00001.safetensors"]
    assert read_manifest(folder) is not None
    other = _perturbed(ns["model"])
    Booster().load_model(other, folder)  # the folder holds the model's weights
    _assert_same_state(other.state_dict(), ns["model"].state_dict())


def test_load_options(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns = run_section(README, LOAD_OPTIONS)
    state = ns["model"].state_dict()
    assert [(c.key, c.from_dtype, c.to_dtype) for c in ns["report"].cast] == [(k, "float32", "bfloat16") for k in state]
    assert "4 cast to the model's dtype: 0.weight: float32 -> bfloat16" in capsys.readouterr().out
    _assert_same_state(ns["bf16"].state_dict(), {k: v.to(torch.bfloat16) for k, v in state.items()})
    assert all(v.device.type == "cpu" for v in ns["empty"].state_dict().values())
    _assert_same_state(ns["empty"].state_dict(), state)
    _assert_same_state(ns["first"].state_dict(), {"weight": state["0.weight"], "bias": state["0.bias"]})
    _assert_same_state(ns["tensors"], {"3.bias": state["3.bias"]})


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' notes to peft
def test_smaller_checkpoints(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns = run_section(README, SMALLER)
    adapters = {k: v for k, v in ns["lora_model"].state_dict().items() if "lora_" in k}
    assert len(adapters) == 4
    _assert_same_state({k: v for k, v in ns["resumed"].state_dict().items() if "lora_" in k}, adapters)
    _assert_same_state(ns["resumed"].state_dict(), ns["lora_model"].state_dict())  # the base came back too
    index = json.loads((ns["path"] / "modeling" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(adapters) and len(index["metadata"]["frozen_keys"]) == 4
    assert "4 left out of this trainable-only checkpoint (frozen when saved" in capsys.readouterr().out
    from peft import PeftModel

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 4))
    _assert_same_state(
        PeftModel.from_pretrained(base, tmp_path / "ckpt" / "adapter").state_dict(),
        adapters | {k: v for k, v in ns["lora_model"].state_dict().items() if "lora_" not in k},
    )


def test_async_save(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prelude, *blocks = section(README, ASYNC)
    ns: dict = {"__name__": "__main__"}
    run_block(prelude, ns)
    ns["model"](torch.randn(4, 16)).square().mean().backward()  # gradients, so optimizer.step() changes weights
    before = {k: v.clone() for k, v in ns["model"].state_dict().items()}
    for block in blocks:
        run_block(block, ns)
    after = ns["model"].state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before), "optimizer.step() changed nothing"
    other = _perturbed(ns["model"])
    Booster().load_model(other, tmp_path / "ckpt" / "model", verify=True)
    _assert_same_state(other.state_dict(), before)  # the state at the call, not after optimizer.step()


def test_tools_from_python(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_section(README, CLI)
    state = ns["model"].state_dict()
    info = ns["info"]
    assert info["kind"] == "model" and info["tensor_count"] == len(state) and info["sharded"]
    assert len(info["files"]) > 1  # size_per_shard=0.001 gave several shards
    assert ns["problems"] == [] and any("checksum" in line for line in ns["passed"])
    other = _perturbed(ns["model"])
    Booster().load_model(other, tmp_path / "model.bin")  # the converted file holds the model's weights
    _assert_same_state(other.state_dict(), state)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_from_dcp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_section(README, FROM_DCP)
    state = ns["model"].state_dict()
    assert (tmp_path / "dcp_ckpt" / ".metadata").is_file()
    for folder in ("dcp_ckpt", "hf_model"):  # the DCP folder and its conversion hold the model's weights
        other = _perturbed(ns["model"])
        Booster().load_model(other, tmp_path / folder)
        _assert_same_state(other.state_dict(), state)
    other = _perturbed(ns["model"])
    optimizer = torch.optim.AdamW(other.parameters(), lr=0.5)
    booster = Booster()
    other, optimizer, *_ = booster.boost(other, optimizer)
    booster.load_optimizer(optimizer, tmp_path / "dcp_ckpt")
    saved = ns["optimizer"].state_dict()
    assert optimizer.state_dict()["param_groups"] == saved["param_groups"]  # lr=1e-3 came back
    _assert_same_state(optimizer.state_dict()["state"][0], saved["state"][0])


def test_migration_guide_imports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_section(MIGRATING, SWAP_IMPORTS)
    assert ns["Booster"] is ckptio.Booster
    assert ns["TorchDDPPlugin"] is ckptio.plugins.TorchDDPPlugin
    assert ns["save_checkpoint"] is ckptio.training.save_checkpoint
    # "keep their signatures": ColossalChat's positional parameters, in its order
    params = list(inspect.signature(ns["save_checkpoint"]).parameters)[:9]
    assert params == ["save_dir", "booster", "model", "optimizer", "lr_scheduler", "epoch", "step", "batch_size",
                      "coordinator"]  # fmt: skip
    assert list(inspect.signature(ns["load_checkpoint"]).parameters)[:5] == [
        "load_dir", "booster", "model", "optimizer", "lr_scheduler"
    ]  # fmt: skip


def test_from_trainer(tmp_path, monkeypatch):
    """The README's model trained by a real transformers.Trainer (8 steps, a checkpoint every 3), then
    its checkpoint-6 loaded and the newest, checkpoint-8, resumed by a manager."""
    from transformers import Trainer, TrainingArguments

    monkeypatch.chdir(tmp_path)
    model = _prelude_model()
    gen = torch.Generator().manual_seed(0)
    data = [{"input": torch.randn(16, generator=gen), "labels": i % 4} for i in range(16)]
    args = TrainingArguments(
        output_dir="trainer_output", per_device_train_batch_size=4, num_train_epochs=2, save_steps=3,
        remove_unused_columns=False, use_cpu=True, report_to=[], disable_tqdm=True,
    )  # fmt: skip
    loss = lambda out, labels, num_items_in_batch=None: torch.nn.functional.cross_entropy(out, labels)  # noqa: E731
    Trainer(model=model, args=args, train_dataset=data, compute_loss_func=loss).train()
    ns = run_section(README, FROM_TRAINER)
    assert (ns["epoch"], ns["step"], ns["sample_start_index"]) == (1, 2, 8)  # epoch 1.5: 2 of 4 steps, batches of 4
    assert ns["resumed"] == (2, 0, 0)  # the manager took the newest, checkpoint-8: 2 epochs done
    newest = tmp_path / "trainer_output" / "checkpoint-8"
    _assert_same_state(ns["model"].state_dict(), load_file(newest / "model.safetensors"))
    saved = torch.load(newest / "optimizer.pt", weights_only=True)
    assert ns["optimizer"].state_dict()["param_groups"] == saved["param_groups"]


def test_from_accelerate(tmp_path, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.chdir(tmp_path)
    model = _prelude_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for _ in range(2):
        model(torch.randn(4, 16)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    accelerator.save_state("accelerate_state")
    with pytest.warns(UserWarning, match="records no epoch, step or sample position"):
        ns = run_section(README, FROM_ACCELERATE)
    _assert_same_state(ns["model"].state_dict(), model.state_dict())
    assert ns["optimizer"].state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert ns["lr_scheduler"].state_dict() == scheduler.state_dict()


@pytest.fixture
def s3_my_bucket(monkeypatch):
    """moto's S3 server on 127.0.0.1 with the bucket the README names; fsspec pointed at it."""
    pytest.importorskip("s3fs", reason="s3fs is needed for the S3 snippet (pip install -e .[dev])")
    boto3 = pytest.importorskip("boto3", reason="boto3 is needed to create the bucket")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is needed for the loopback S3 server")
    import fsspec

    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="my-bucket")
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint, "key": "testing", "secret": "testing"})
        fsspec.filesystem("s3").invalidate_cache()
        yield fsspec.filesystem("s3")
        fsspec.filesystem("s3").invalidate_cache()
    finally:
        server.stop()


def test_remote_storage_on_s3(tmp_path, monkeypatch, s3_my_bucket):
    monkeypatch.chdir(tmp_path)
    ns = run_section(README, REMOTE)
    fs = s3_my_bucket
    fs.invalidate_cache()
    assert fs.exists("my-bucket/run1/ckpt/_CKPTIO_COMMITTED")
    assert fs.exists("my-bucket/run1/epoch-0_step-100/_CKPTIO_COMMITTED")
    other = _perturbed(ns["model"])
    Booster().load_model(other, "s3://my-bucket/run1/ckpt", verify=True)
    _assert_same_state(other.state_dict(), ns["model"].state_dict())
    other = _perturbed(ns["model"])
    position = load_checkpoint("s3://my-bucket/run1/epoch-0_step-100", Booster(), other, None, None, verify=True)
    assert position == (0, 100, 800)
    _assert_same_state(other.state_dict(), ns["model"].state_dict())
    assert not list(tmp_path.iterdir()), "the s3:// snippet wrote into the working directory"


# ----------------------------------------------------------------------------- several ranks


def _run_on_ranks(heading: str, world_size: int, tmp_path: Path) -> list:
    """Run a section on ``world_size`` real ranks (cwd: ``tmp_path``); each rank then zeroes its
    shards, loads the folder again and returns the names whose full tensor differs from the
    README's initial model (nothing was trained, so the checkpoint must hold exactly that)."""

    def scenario(ctx):
        os.chdir(tmp_path)

        def on_rank():
            ns = run_section(README, heading)
            with torch.no_grad():
                for p in ns["model"].parameters():
                    p.zero_()
            ns["booster"].load_model(ns["model"], "ckpt/model")
            reference = _prelude_model().state_dict()
            full = _full(ns["model"].state_dict())
            assert full.keys() == reference.keys(), (sorted(full), sorted(reference))
            return [k for k in reference if not torch.equal(full[k], reference[k])]

        return ctx.phase(world_size, "snippets", on_rank)

    return run_ranks(scenario, world_size, tmp_path)


def _check_folder_on_one_process(folder: Path, world_size: int) -> None:
    manifest = read_manifest(folder)
    assert manifest is not None and manifest.extra["world_size"] == world_size
    model = _prelude_model()
    other = _perturbed(model)
    Booster().load_model(other, folder, verify=True)  # saved on several ranks, loaded in one process
    _assert_same_state(other.state_dict(), model.state_dict())


@pytest.mark.dist
def test_many_ranks_on_2_ranks(tmp_path):
    assert _run_on_ranks(MANY_RANKS, 2, tmp_path) == [[], []]
    _check_folder_on_one_process(tmp_path / "ckpt" / "model", 2)


@pytest.mark.dist
def test_two_dimensions_on_4_ranks(tmp_path):
    assert _run_on_ranks(TWO_DIMENSIONS, 4, tmp_path) == [[], [], [], []]
    _check_folder_on_one_process(tmp_path / "ckpt" / "model", 4)
    manifest = read_manifest(tmp_path / "ckpt" / "model")
    assert manifest.extra["layout"]["mesh_shape"] == {"dp": 2, "tp": 2}


@pytest.mark.dist
def test_zero_and_gemini_on_2_ranks(tmp_path):
    assert _run_on_ranks(ZERO_GEMINI, 2, tmp_path) == [[], []]  # bf16 compute; the fp32 weights are saved
    _check_folder_on_one_process(tmp_path / "ckpt" / "model", 2)
    assert read_manifest(tmp_path / "ckpt" / "model").extra["layout"]["plugin"] == "LowLevelZeroPlugin"
    index = json.loads((tmp_path / "ckpt" / "optim" / "optimizer.index.json").read_text())
    assert "0.weight" in json.dumps(index)  # the optimizer by parameter name


# ----------------------------------------------------------------------------- training section, fresh processes


def _run_training_section(cwd: Path, out: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    """The training section in a fresh interpreter in ``cwd`` (``tests/docs/snippets.py``), this
    process's ckptio first on the path; with ``kill_at``, SIGKILLed before that train_step call."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(ckptio.__file__).parents[1])  # the ckptio this test imported
    cmd = [sys.executable, str(ROOT / "tests" / "docs" / "snippets.py"), str(README), TRAINING, str(out)]
    if kill_at is not None:
        cmd += ["--kill-at", str(kill_at)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def _losses(out: Path) -> list[str]:
    return (out / "losses.txt").read_text().split()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The training section run once, uninterrupted: its folder, per-step losses and final weights."""
    tmp = tmp_path_factory.mktemp("straight")
    proc = _run_training_section(tmp / "job", tmp / "out")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "job", _losses(tmp / "out"), torch.load(tmp / "out" / "final.pt", weights_only=True)


@pytest.mark.slow
def test_training_section(straight):
    cwd, losses, final = straight
    assert len(losses) == STEPS_PER_EPOCH * EPOCHS
    # save_optimizer / save_lr_scheduler: ckptio's optimizer layout, the scheduler as ColossalAI reads it
    assert (cwd / "ckpt" / "optim" / "optimizer.index.json").is_file()
    assert torch.load(cwd / "ckpt" / "lr_scheduler", weights_only=True)["last_epoch"] == 0
    model = _prelude_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    Booster().load_optimizer(optimizer, cwd / "ckpt" / "optim")
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25e-3)  # LinearLR's first factor, from the file
    # save_checkpoint / load_checkpoint at epoch 0, step 0
    running = json.loads((cwd / "runs" / "exp0" / "epoch-0_step-0" / "running_states.json").read_text())
    assert (running["epoch"], running["step"], running["sample_start_index"]) == (0, 0, 0)
    # CheckpointManager: every 2 steps, the newest 3 kept, plus every step-4 (keep_every) one
    assert sorted(os.listdir(cwd / "runs" / "exp1")) == [
        "epoch-0_step-4", "epoch-1_step-4", "epoch-2_step-2", "epoch-2_step-4"
    ]  # fmt: skip
    newest = CheckpointManager(cwd / "runs" / "exp1", None).latest()
    assert newest.name == "epoch-2_step-4"
    sampler_state = json.loads((newest / "running_states.json").read_text())["sampler"]
    assert (sampler_state["epoch"], sampler_state["start_index"]) == (2, 32)
    other = _perturbed(model)
    Booster().load_model(other, newest)  # the newest checkpoint holds the final weights
    _assert_same_state(other.state_dict(), final)


@pytest.mark.slow
def test_manager_loop_resumes_bit_exact_after_kills(straight, tmp_path):
    """The README's training section, killed (SIGKILL) in a fresh process, then run again in a
    fresh process so that its CheckpointManager loop resumes: first stopped one step after an
    epoch-boundary checkpoint, then (the resumed run) one step after a mid-epoch one. Every step
    any run trained has the uninterrupted run's loss, and the final weights are the same, bit for bit."""
    straight_job, reference, reference_final = straight
    job = tmp_path / "job"

    def step_of(name: str) -> int:  # global step of an epoch-E_step-S checkpoint
        epoch, step = (int(part.split("-")[1]) for part in name.split("_"))
        return epoch * STEPS_PER_EPOCH + step

    done = 0  # global steps in the newest checkpoint
    for run, (kill_at, stops_after) in enumerate([(6, "epoch-0_step-4"), (4, "epoch-1_step-2"), (None, None)]):
        out = tmp_path / f"run{run}"
        proc = _run_training_section(job, out, kill_at=kill_at)
        losses = _losses(out)
        assert losses == reference[done : done + len(losses)], f"run {run} (resumed at global step {done})"
        if kill_at is None:
            assert proc.returncode == 0, proc.stderr[-4000:]
            assert done + len(losses) == len(reference)
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
        assert len(losses) == kill_at - 1
        newest = CheckpointManager(job / "runs" / "exp1", None).latest()
        assert newest.name == stops_after  # the step after it was trained, then lost with the process
        done = step_of(newest.name)
    _assert_same_state(torch.load(out / "final.pt", weights_only=True), reference_final)
    assert sorted(os.listdir(job / "runs" / "exp1")) == sorted(os.listdir(straight_job / "runs" / "exp1"))
