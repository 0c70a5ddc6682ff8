"""Every ``ckptio`` command takes ``file:///abs/path`` as ``/abs/path``."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from torch import nn

from ckptio import Booster
from ckptio.cli import main


def test_every_command_takes_file_urls(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    Booster().save_model(model, tmp_path / "ckpt", shard=True, use_safetensors=True)
    src, dst = f"file://{tmp_path}/ckpt", f"file://{tmp_path}/one.safetensors"

    def run(*args):
        result = CliRunner().invoke(main, list(args), catch_exceptions=False)
        return result.exit_code, result.output

    for args in (("inspect", src), ("verify", src), ("convert", src, dst), ("diff", src, dst)):
        code, out = run(*args)
        assert code == 0, (args, out)
    assert (tmp_path / "one.safetensors").is_file()
    assert list(cwd.iterdir()) == []
    code, out = run("inspect", "file://otherhost/ckpt")
    assert code == 2 and "file:///" in out
