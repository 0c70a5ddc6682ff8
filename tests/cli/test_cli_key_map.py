"""``ckptio convert --key-map``: sed-like renames on the way, bad expressions refused as bad input."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner

from ckptio import load_state_dict
from ckptio.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture
def dcp_folder(tmp_path):
    state = {f"layers.{i}.wq.weight": torch.randn(4, 4) for i in range(2)} | {"freqs_cis": torch.ones(3)}
    dcp.save({"model": state}, checkpoint_id=tmp_path / "dcp")
    return tmp_path / "dcp", state


def test_key_map_expressions_rename_and_leave_out(dcp_folder, tmp_path):
    src, state = dcp_folder
    exprs = [r"s|^layers\.(\d+)\.wq\.|model.layers.\1.self_attn.q_proj.|", "/^freqs_cis$/d"]
    done = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "hf"), *(f"--key-map={e}" for e in exprs)])
    assert done.exit_code == 0, done.output
    assert "wrote" in done.output and "2 tensors" in done.output
    loaded = load_state_dict(tmp_path / "hf")
    assert list(loaded) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(loaded["model.layers.1.self_attn.q_proj.weight"], state["layers.1.wq.weight"])


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("s/(/x/", "--key-map 's/(/x/': bad regular expression"),
        ("layers", "--key-map 'layers': expected s/REGEX/REPLACEMENT/"),
        (r"s/\d+/0/", "key_map renames both 'layers.0.wq.weight' and 'layers.1.wq.weight' to 'layers.0.wq.weight'"),
    ],
)
def test_bad_key_map_is_bad_input_and_writes_nothing(dcp_folder, tmp_path, expr, message):
    src, _ = dcp_folder
    done = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "hf"), "--key-map", expr])
    assert done.exit_code == 2, done.output
    assert done.output.startswith("error: ") and message in done.output
    assert not (tmp_path / "hf").exists()
