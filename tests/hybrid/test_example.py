"""The README's 2-D example runs end to end: (dp=2, tp=2) training and save, resume at
(dp=1, tp=2), and a ``transformers`` load equal to ckptio's single-process load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hybrid_2d.py"


@pytest.mark.slow
@pytest.mark.dist
def test_hybrid_2d_example_runs_and_checks_itself(tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "transformers.from_pretrained == single-process load: True" in done.stdout
    assert "[resume mesh dp=1 tp=2] step 3 loss" in done.stdout  # the resumed job trained on
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()
