"""The README main command's job (examples/demo.py), small, on its single-process path:
interrupted + resumed in new processes == uninterrupted, bit for bit."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def single_process_flags() -> list[str]:
    """The demo may default to several ranks; this test pins one process without a plugin."""
    spec = importlib.util.spec_from_file_location("ckptio_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    defaults = vars(demo.parse_args([]))
    return ["--nproc", "1", "--plugin", "none"] if "nproc" in defaults else []


SMALL = ["--epochs", "2", "--samples", "64", "--batch-size", "8", "--save-every", "3", "--interrupt-at", "11"]


def run_demo(workdir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DEMO), "--workdir", str(workdir), *SMALL, *flags],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_demo_resumes_bit_exactly(tmp_path):
    result = run_demo(tmp_path, *single_process_flags())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "losses            : 16/16 bit-identical" in result.stdout
    assert "RESULT: resumed run matches the uninterrupted run exactly" in result.stdout
    assert (tmp_path / "checkpoints" / "epoch-1_step-1" / "running_states.json").is_file()


@pytest.mark.dist
def test_demo_on_2_fsdp_ranks_with_async_saves_resumes_bit_exactly(tmp_path):
    """The default 2-rank FSDP2 job with use_async=True: the save in flight when the run dies is
    never used, the resume takes the newest committed one, and the result is still exact."""
    result = run_demo(tmp_path, "--use-async")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(use_async=True)" in result.stdout
    assert "RESULT: resumed run matches the uninterrupted run exactly" in result.stdout
