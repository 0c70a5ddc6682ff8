"""Our safetensors writer and reader: golden bytes, interop with the reference package,
and hand-crafted broken headers."""

import json
import struct

import pytest
import safetensors.torch
import torch

from ckptio.errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError
from ckptio.formats.safetensors_format import SafetensorsReader, iter_file_chunks


def write(path, tensors, metadata=None):
    with open(path, "wb") as fh:
        for chunk in iter_file_chunks(list(tensors.items()), metadata):
            fh.write(chunk)


def test_golden_bytes_of_a_tiny_file(tmp_path):
    path = tmp_path / "t.safetensors"
    write(path, {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([7], dtype=torch.int8)})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header == {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I8", "shape": [1], "data_offsets": [8, 9]},
    }
    assert (8 + n) % 8 == 0, "data section must start 8-byte aligned"
    assert raw[8 + n :] == struct.pack("<ff", 1.0, 2.0) + b"\x07"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_reference_package_reads_what_we_write(tmp_path, dtype):
    tensors = {
        "w": torch.randn(3, 5).to(dtype),
        "scalar": torch.tensor(3).to(dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
    }
    path = tmp_path / "ours.safetensors"
    write(path, tensors, {"format": "pt"})
    back = safetensors.torch.load_file(str(path))
    assert set(back) == set(tensors)
    for k in tensors:
        assert torch.equal(back[k], tensors[k]), k


def test_we_read_what_the_reference_package_writes_and_read_rows(tmp_path):
    tensors = {"x": torch.arange(24, dtype=torch.float32).reshape(6, 4), "y": torch.randn(2).to(torch.bfloat16)}
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"k": "v"})
    with SafetensorsReader.open(path) as reader:
        assert reader.metadata == {"k": "v"}
        assert torch.equal(reader.read("y"), tensors["y"])
        dest = torch.empty(6, 4)
        reader.read_into("x", dest)
        assert torch.equal(dest, tensors["x"])
        assert torch.equal(reader.read_rows("x", 2, 5), tensors["x"][2:5])
        assert reader.read_rows("x", 5, 9).shape == (1, 4)


def craft(path, header: dict, data: bytes):
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


@pytest.mark.parametrize(
    "header,data,message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8 bytes"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9, "trailing"),
        ({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown safetensors dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "invalid data_offsets"),
        ({"a": [1, 2]}, b"", "not an object"),
    ],
)
def test_broken_headers_are_refused_naming_the_file(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    craft(path, header, data)
    with pytest.raises(CheckpointFormatError, match=message) as info:
        SafetensorsReader.open(path)
    assert str(path) in str(info.value)


def test_header_length_beyond_file_and_non_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointCorruptError, match="header claims"):
        SafetensorsReader.open(path)
    path.write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        SafetensorsReader.open(path)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="shorter than"):
        SafetensorsReader.open(path)
