"""Exact resume: k steps + save_checkpoint + a FRESH PROCESS + load_checkpoint + the rest equals
an uninterrupted run, bit for bit (dropout, shuffled sampler, NumPy and Python randomness)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.training.resume_job import train

TOTAL = 14  # 6 steps per epoch: checkpoints at the end of epoch 0 (step 6) and mid-epoch 1 (step 7)
JOB = Path(__file__).with_name("resume_job.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    straight, straight_model, _ = train(TOTAL)
    first, _, saved = train(7, ckpt_dir=tmp / "ckpts", save_at=(6, 7))
    return tmp, straight, {k: v.clone() for k, v in straight_model.state_dict().items()}, first, saved


@pytest.mark.parametrize("which", [0, 1], ids=["end-of-epoch", "mid-epoch"])
def test_resume_in_fresh_process_is_bit_exact(runs, which):
    tmp, straight, straight_state, first, saved = runs
    ckpt = saved[which]
    assert ckpt.name == ["epoch-0_step-6", "epoch-1_step-1"][which]
    out = tmp / f"resumed-{which}"
    subprocess.run(
        [sys.executable, str(JOB), "--resume", str(ckpt), "--steps", str(TOTAL), "--out", str(out)],
        check=True,
        timeout=120,
    )
    resumed = {int(k): v for k, v in json.loads((out / "losses.json").read_text()).items()}
    start = 6 + which
    assert sorted(resumed) == list(range(start + 1, TOTAL + 1))
    combined = {s: first[s] for s in range(1, start + 1)} | resumed
    assert combined == straight  # every loss, exact float bits
    final = load_file(str(out / "final.safetensors"))
    assert final.keys() == straight_state.keys()
    for key, value in straight_state.items():
        assert torch.equal(final[key], value), key


def test_without_rng_restore_the_run_differs(runs):
    """The check above is sensitive: skipping the RNG restore changes the dropout masks."""
    _, straight, _, _, saved = runs
    resumed, _, _ = train(TOTAL, resume_from=saved[1], restore_rng=False)
    assert any(resumed[s] != straight[s] for s in resumed)
