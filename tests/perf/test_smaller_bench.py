"""benchmarks/smaller.py runs end to end on a tiny Llama, so it never rots, and its figures keep
the promise: a linked checkpoint writes what changed (plus metadata), not the frozen part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="the benchmark counts bytes with /proc/self/io")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_smaller_benchmark_smoke_run(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import smaller

    out = tmp_path / "out"
    args = ["--hidden", "64", "--layers", "2", "--vocab", "2048", "--checkpoints", "2", "--shard-mib", "0.25"]
    assert smaller.main([*args, "--dir", str(tmp_path), "--out", str(out)]) == 0
    results = {(r["run"], r["mode"]): r for r in json.loads((out / "smaller.json").read_text())["results"]}
    assert set(results) == {(run, mode) for run in ("lora", "half") for mode in ("full", "linked", "trainable-only")}
    for run in ("lora", "half"):
        full, linked, trainable = (results[run, m] for m in ("full", "linked", "trainable-only"))
        trained_weights = linked["changed_bytes"] // 3  # AdamW: two more tensors per trained parameter
        frozen = full["weights_bytes"] - trained_weights
        assert all(w >= full["weights_bytes"] for w in full["written"])  # every byte, every time
        # the second checkpoint links the frozen part: it writes what changed, and metadata
        assert linked["changed_bytes"] <= linked["written"][1] <= full["written"][1] - frozen * 0.99
        assert trainable["on_disk"] < linked["on_disk"] < full["on_disk"]
    assert "| lora | linked |" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ckptio-smaller-")]  # cleaned up
