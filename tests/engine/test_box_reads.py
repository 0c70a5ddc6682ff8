"""Reading a rank's box of a tensor from a safetensors file: exact values, only its bytes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from safetensors.torch import save_file

from ckptio.engine import reader as dt
from ckptio.engine.reader import TensorFile
from ckptio.engine.spread import ExchangedSpread
from ckptio.engine.tensors import Region


@pytest.fixture
def tensor_file(tmp_path):
    full = torch.arange(6 * 5 * 4 * 1000, dtype=torch.float32).reshape(6, 5, 4, 1000)
    path = tmp_path / "t.safetensors"
    save_file({"x": full, "s": torch.tensor(3.5)}, path)
    return path, full


def _boxes(shape):
    for dim in range(len(shape)):
        for start, size in ((0, 1), (1, shape[dim] - 2), (shape[dim] - 1, 1), (0, shape[dim])):
            offset = [0] * len(shape)
            box = list(shape)
            offset[dim], box[dim] = start, size
            yield Region(tuple(offset), tuple(box))
    yield Region((2, 1, 1, 10), (3, 3, 2, 500))  # cut on every dim


def test_every_box_reads_exact_values_and_only_its_bytes(tensor_file, monkeypatch):
    path, full = tensor_file
    read = []
    real = dt._pread_exact
    monkeypatch.setattr(dt, "_pread_exact", lambda fd, view, off, p: (read.append(len(view)), real(fd, view, off, p)))
    reader = TensorFile(path)
    try:
        for region in _boxes(tuple(full.shape)):
            read.clear()
            out = torch.empty(region.shape)
            reader.read_box("x", region, out)
            assert torch.equal(out, full[region.index()]), region
            # contiguous runs of >= _RUN_BYTES are read exactly; shorter ones as whole rows of the box's dim-0 range
            cut = max([d for d in range(full.dim()) if region.shape[d] != full.shape[d]], default=0)
            run_bytes = region.shape[cut] * full[(0,) * (cut + 1)].numel() * 4
            if math.prod(region.shape[:cut]) == 1 or run_bytes >= dt._RUN_BYTES:
                assert sum(read) == region.numel * 4, region
            else:
                assert sum(read) == region.shape[0] * full[0].numel() * 4, region
        scalar = torch.empty(())
        reader.read_box("s", Region((), ()), scalar)
        assert scalar.item() == 3.5
    finally:
        reader.close()


def test_region_index_and_sources():
    regions = [Region((0, 0), (2, 3)), Region((0, 0), (2, 3)), Region((2, 0), (0, 3)), Region((2, 0), (1, 3))]
    spread = ExchangedSpread((3, 3), tuple(regions))
    assert spread.sources() == [(0, regions[0]), (3, regions[3])]  # replicas once, empty boxes never
    assert Region((1, 2), (2, 2)).index() == (slice(1, 3), slice(2, 4))
    assert list(itertools.islice(_boxes((3, 4)), 1)) == [Region((0, 0), (1, 4))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_box_read_into_another_dtype_is_cast(tensor_file, dtype):
    """A rank's bf16 shard of an fp32 tensor gets the values cast, not the file's bytes."""
    path, full = tensor_file
    with TensorFile(path) as reader:
        for region in (Region((1, 0, 0, 0), (2, 5, 4, 1000)), Region((2, 1, 1, 10), (3, 3, 2, 500))):
            out = torch.full(region.shape, -1.0, dtype=dtype)
            reader.read_box("x", region, out)
            assert torch.equal(out, full[region.index()].to(dtype)), region
        scalar = torch.empty((), dtype=dtype)
        reader.read_box("s", Region((), ()), scalar)
        assert scalar.item() == 3.5
