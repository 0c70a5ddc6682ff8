"""The benchmark runs end to end on a tiny state dict, so it never rots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke_run(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--size-gb", "0.002", "--repeats", "1"]
    cmd += ["--settle", "0", "--dir", str(tmp_path), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads((out / "bench.json").read_text())
    tools = {"raw", "ckptio", "torch", "torch_mmap", "safetensors", "transformers", "dcp"}
    for op, expected in (("save", tools - {"torch_mmap"}), ("load warm", tools)):
        missing = {t for t in expected if f"{op}/{t}" not in result["medians"]}
        assert not missing, (op, missing)
    assert "async save, call returns/ckptio" in result["medians"]
    assert "async save, durable/ckptio" in result["medians"]
    assert result["targets"]  # every target is evaluated (met or not) on real numbers
    assert "| save | ckptio |" in done.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ckptio-bench-")]  # cleaned up
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib not installed: the chart is optional")
    assert (out / "bench.png").read_bytes().startswith(b"\x89PNG")


def test_benchmark_many_small_tensors_case(tmp_path, monkeypatch):
    """In this process (the run above already pays for one interpreter start)."""
    import importlib.util

    monkeypatch.setattr(sys, "path", list(sys.path))  # run.py puts benchmarks/ first
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(bench)
        args = ["--many-small", "50", "--repeats", "1", "--settle", "0", "--no-cold", "--no-chart"]
        result = bench.run(bench.parse_args([*args, "--tools", "safetensors", "transformers", "--dir", str(tmp_path)]))
        table = bench.report.table(result)
    finally:
        for name in ("cases", "report"):
            sys.modules.pop(name, None)
    assert result["tensors"] == 50 and result["state"] == "50 float32 tensors of 16 elements"
    assert {"load warm/ckptio", "load warm/safetensors", "save/ckptio"} <= set(result["medians"])
    assert "transformers" not in result["tools"], "needs a PreTrainedModel: skipped"
    assert "50 float32 tensors of 16 elements" in table
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ckptio-bench-")]  # cleaned up
