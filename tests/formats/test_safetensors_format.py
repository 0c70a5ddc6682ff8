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


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor (torch.equal is not implemented for float8_e8m0fnu / float4_e2m1fn_x2)."""
    return t.contiguous().view(torch.uint8)


def _micro_scaled() -> dict[str, torch.Tensor]:
    """MX-style tensors: float8_e8m0fnu scales and packed float4 (two E2M1 values per byte)."""
    packed = torch.arange(24, dtype=torch.uint8).reshape(4, 6)
    return {
        "scales": torch.tensor([1.0, 2.0, 0.5, 2.0**-20]).to(torch.float8_e8m0fnu),
        "scalar_scale": torch.tensor(4.0).to(torch.float8_e8m0fnu),
        "fp4": packed.view(torch.float4_e2m1fn_x2),
        "fp4_rows": packed[:1].clone().reshape(1, 2, 3).view(torch.float4_e2m1fn_x2),
        "fp4_empty": torch.zeros(2, 0, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
    }


def test_f8_e8m0_and_packed_f4_match_the_reference_package_both_ways(tmp_path):
    tensors = _micro_scaled()
    ours = tmp_path / "ours.safetensors"
    write(ours, tensors)
    raw = ours.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert header["scales"]["dtype"] == "F8_E8M0" and header["fp4"]["dtype"] == "F4"
    assert header["fp4"]["shape"] == [4, 12], "F4 counts 4-bit values: the last dimension doubles"
    assert header["fp4_rows"]["shape"] == [1, 2, 6] and header["fp4_empty"]["shape"] == [2, 0]
    theirs = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(tensors, str(theirs))
    raw = theirs.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    for k, entry in json.loads(raw[8 : 8 + n]).items():  # the reference orders tensors its own way
        assert (entry["dtype"], entry["shape"]) == (header[k]["dtype"], header[k]["shape"]), k
    back = safetensors.torch.load_file(str(ours))
    with SafetensorsReader.open(theirs) as reader:
        ours_back = {k: reader.read(k) for k in reader.tensors}
    for k, t in tensors.items():
        for got in (back[k], ours_back[k]):
            assert got.dtype == t.dtype and got.shape == t.shape, k
            assert torch.equal(_bits(got), _bits(t)), k


@pytest.mark.parametrize(
    "shape,nbytes,message",
    [([3], 2, "multiple of 2"), ([2, 3], 3, "multiple of 2"), ([], 1, "multiple of 2")],
)
def test_f4_headers_with_half_bytes_are_refused(tmp_path, shape, nbytes, message):
    path = tmp_path / "bad.safetensors"
    craft(path, {"t": {"dtype": "F4", "shape": shape, "data_offsets": [0, nbytes]}}, b"\x11" * nbytes)
    with pytest.raises(CheckpointFormatError, match=message) as info:
        SafetensorsReader.open(path)
    assert str(path) in str(info.value)
    with pytest.raises(Exception):  # noqa: B017 (the reference refuses them too, with its own error)
        safetensors.torch.load_file(str(path))


def test_a_0_dim_f4_tensor_is_refused_on_write():
    scalar = torch.tensor(7, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(CheckpointFormatError, match="0-dim float4_e2m1fn_x2"):
        b"".join(iter_file_chunks([("t", scalar)]))


@pytest.mark.parametrize("shard", [False, True])
def test_a_model_with_micro_scaled_buffers_saves_and_loads(tmp_path, shard):
    from torch import nn

    from ckptio import Booster

    def module(fill: int) -> nn.Module:
        m = nn.Module()
        for k, t in _micro_scaled().items():
            m.register_buffer(k, t if fill < 0 else torch.full_like(_bits(t), fill).view(t.dtype))
        return m

    saved, target = module(-1), module(0)
    path = tmp_path / ("ckpt" if shard else "w.safetensors")
    Booster().save_model(saved, path, shard=shard, use_safetensors=True)
    Booster().load_model(target, path)
    for k, t in saved.state_dict().items():
        assert torch.equal(_bits(target.state_dict()[k]), _bits(t)), k


def test_diff_compares_the_values_of_packed_f4(tmp_path):
    from ckptio.tools import diff_checkpoints

    a = {"fp4": torch.tensor([0x21, 0x00], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}  # [0.5, 1.0], [0, 0]
    b = {"fp4": torch.tensor([0x71, 0x00], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}  # [0.5, 6.0], [0, 0]
    write(tmp_path / "a.safetensors", a)
    write(tmp_path / "b.safetensors", b)
    assert diff_checkpoints(tmp_path / "a.safetensors", tmp_path / "a.safetensors")["equal"]
    report = diff_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert not report["equal"] and report["max_abs_diff"] == 5.0
