"""A load parses each header once and reads runs of small tensors with one ``preadv`` each.

The speed itself is measured by ``benchmarks/run.py --many-small 5000``; these pin the
mechanism (counts of parses and syscalls) and that the values stay exact."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from ckptio import Booster
from ckptio.engine import load
from ckptio.engine.group import Group
from ckptio.engine.reader import TensorFile, read_header
from ckptio.formats.safetensors_format import SafetensorsReader

N = 3000
HEADER_READS = 2  # a header parse reads its length, then its JSON


def many(seed: int) -> nn.ParameterDict:
    torch.manual_seed(seed)
    return nn.ParameterDict({f"p{i}": nn.Parameter(torch.randn(4)) for i in range(N)})


@pytest.fixture
def saved(tmp_path):
    model = many(0)
    Booster().save_model(model, tmp_path / "one.safetensors")
    Booster().save_model(model, tmp_path / "sharded", shard=True, use_safetensors=True, size_per_shard=0.01)
    return tmp_path, model


@pytest.fixture
def counted(monkeypatch):
    counts = {"parse": 0, "preadv": 0}
    parse, preadv = SafetensorsReader._parse_header, os.preadv

    def counting_parse(self):
        counts["parse"] += 1
        return parse(self)

    def counting_preadv(*args):
        counts["preadv"] += 1
        return preadv(*args)

    monkeypatch.setattr(SafetensorsReader, "_parse_header", counting_parse)
    monkeypatch.setattr(os, "preadv", counting_preadv)
    return counts


@pytest.mark.parametrize("layout", ["one.safetensors", "sharded"])
def test_each_header_is_parsed_once_and_small_tensors_are_read_in_runs(saved, counted, layout):
    root, model = saved
    files = 1 if layout == "one.safetensors" else len(list((root / layout).glob("model-*.safetensors")))
    target = many(1)
    Booster().load_model(target, root / layout)
    assert all(torch.equal(target[k], model[k]) for k in model)
    assert counted["parse"] == files, "the copy reuses the headers the key match parsed"
    data_reads = counted["preadv"] - HEADER_READS * counted["parse"]
    assert data_reads <= files + N // 1024, counted  # one run per file, cut every IOV_MAX buffers


def test_gaps_odd_destinations_and_a_changed_file_stay_exact(saved, counted):
    root, model = saved
    path = root / "one.safetensors"
    header = read_header(path)
    dest = {k: torch.zeros(4) for k in model}
    del dest["p10"], dest["p2000"]  # runs broken where keys are not loaded
    dest["p5"] = torch.zeros(8)[::2]  # not contiguous: read on its own
    report = load.load_state(dest, path, Group.of_one(), strict=False)
    assert report.unexpected_keys == ["p10", "p2000"]
    assert all(torch.equal(dest[k], model[k]) for k in dest)
    assert counted["preadv"] - HEADER_READS * counted["parse"] <= 10, counted  # a few runs, not one read per tensor

    # The header kept from before describes a file that was replaced since: it is parsed again.
    other = many(2)
    Booster().save_model(other, path)
    parses = counted["parse"]
    with TensorFile(path, header) as tf:
        out = torch.empty(4)
        tf.copy_into("p7", out)
    assert counted["parse"] == parses + 1 and torch.equal(out, other["p7"])
