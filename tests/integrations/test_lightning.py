"""LightningCheckpointIO in a real Lightning Trainer on CPU: a run killed (SIGKILL) inside a save
resumes from ``ckpt_path="last"`` and ends bit for bit where an uninterrupted run ends; the
``pytorch_lightning`` package's Trainer takes the plugin too.

Lightning's import takes several seconds, so every run is in one subprocess
(``tests/integrations/lightning_job.py``), which writes what the runs ended with for this test to
compare.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ckptio

JOB = Path(__file__).with_name("lightning_job.py")
pytestmark = pytest.mark.slow  # one subprocess: Lightning's import and five short fits, ~12 s of CPU


def _assert_equal(got, want, where=""):
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            _assert_equal(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_equal(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(ckptio.__file__).parents[1]), str(JOB.parents[2])]))
    proc = subprocess.run([sys.executable, str(JOB), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _load(path: Path):
    return torch.load(path, weights_only=True)


def test_killed_inside_a_save_then_resumed_from_last_is_bit_exact(job):
    killed = json.loads((job / "killed.json").read_text())
    assert killed["signal"] == signal.SIGKILL
    # the save of last.ckpt after the second epoch died before its commit: last.ckpt is still the first epoch's
    assert (killed["last_epoch"], killed["last_global_step"]) == (0, 2)
    assert [name.split(".ckptio-tmp-")[0] for name in killed["leftovers"]] == [".last.ckpt"]  # never read
    _assert_equal(_load(job / "resumed.pt"), _load(job / "straight.pt"))
    _assert_equal(_load(job / "resumed_optimizer.pt"), _load(job / "straight_optimizer.pt"))
    last = job / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() and (last / "ckptio_manifest.json").is_file()  # the async resumed run's, committed
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]  # the next save cleared the leftover


def test_pytorch_lightning_trainer_takes_the_plugin(job):
    _assert_equal(_load(job / "pl_resumed.pt"), _load(job / "pl_straight.pt"))
    assert (job / "pl" / "checkpoints" / "last.ckpt" / "lightning_checkpoint.json").is_file()
