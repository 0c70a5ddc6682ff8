"""Property-based fuzzing of the two things a loader parses before it trusts any byte: the
shard index JSON and the safetensors header. Whatever the input, loading either succeeds
or raises ``CheckpointError``: never another exception, never a hang, never a read outside
the checkpoint folder.

The examples are derandomised so CI runs the same inputs every time; the strategies lean
on near-valid inputs (real key names, real shard names, off-by-one offsets), where bugs
live, rather than on random bytes alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptio import Booster, CheckpointError
from ckptio.formats.safetensors_format import SafetensorsReader
from tests.helpers import MLPWithBuffers, randomize

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ----------------------------------------------------------------------------- index JSON

_KEYS = list(MLPWithBuffers().state_dict())
_SHARD_NAMES = [f"model-{i:05d}-of-{n:05d}.safetensors" for n in range(1, 7) for i in range(1, n + 1)]


@dataclass(frozen=True)
class Corpus:
    work: Path
    folder: Path
    index: Path
    good_index: dict


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    work = tmp_path_factory.mktemp("fuzz")
    folder = work / "model"
    Booster().save_model(randomize(MLPWithBuffers(), 5), folder, shard=True, use_safetensors=True, size_per_shard=0.001)
    (folder / "ckptio_manifest.json").unlink()  # the index alone decides what is read
    index = folder / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    assert set(good["weight_map"].values()) <= set(_SHARD_NAMES) and set(good["weight_map"]) == set(_KEYS)
    first = next(iter(good["weight_map"].values()))
    (work / "outside.safetensors").write_bytes((folder / first).read_bytes())  # bait outside the folder
    return Corpus(work, folder, index, good)


json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
)
any_json = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
shard_names = st.sampled_from(
    [*_SHARD_NAMES[:6], "../outside.safetensors", "/etc/passwd", "./" + _SHARD_NAMES[0], "a/../" + _SHARD_NAMES[0]]
    + ["", ".", "x\\y", "model"]
) | st.text(max_size=20)
weight_maps = st.dictionaries(
    st.sampled_from(_KEYS) | st.text(max_size=10),
    shard_names | any_json,
    max_size=len(_KEYS) + 2,
)
indexes = st.fixed_dictionaries(
    {"weight_map": weight_maps | any_json},
    optional={"metadata": st.fixed_dictionaries({}, optional={"total_size": json_scalars}) | any_json},
)


@FUZZ
@given(index=indexes | any_json)
def test_any_index_json_loads_or_raises_checkpoint_error(corpus, index):
    corpus.index.write_text(json.dumps(index))
    live = MLPWithBuffers()
    try:
        Booster().load_model(live, corpus.folder)
    except CheckpointError:
        return
    # A load that succeeds read only files inside the folder, so it must equal the real weights.
    reference = MLPWithBuffers()
    corpus.index.write_text(json.dumps(corpus.good_index))
    Booster().load_model(reference, corpus.folder)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(live.state_dict()[key], tensor), key


@FUZZ
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_index_bytes_that_are_not_json_raise_checkpoint_error(corpus, raw):
    corpus.index.write_bytes(raw)
    try:
        Booster().load_model(MLPWithBuffers(), corpus.folder)
    except CheckpointError as exc:
        assert "model.safetensors.index.json" in str(exc) or "does not fit" in str(exc)


# ----------------------------------------------------------------------------- safetensors headers

_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "Q4", "", "f32"]
small_ints = st.integers(-4, 80) | st.sampled_from([2**31, 2**63, 2**64 + 1])
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(_DTYPES) | json_scalars,
        "shape": st.lists(small_ints, max_size=3) | json_scalars,
        "data_offsets": st.lists(small_ints, min_size=0, max_size=3) | json_scalars,
    }
)
headers = st.dictionaries(
    st.sampled_from(["fc1.weight", "fc2.bias", "scale", "__metadata__"]) | st.text(max_size=6),
    entries | any_json,
    max_size=4,
)


def _safetensors_bytes(header_raw: bytes, data: bytes, length_delta: int = 0) -> bytes:
    declared = max(0, len(header_raw) + length_delta)
    return struct.pack("<Q", declared) + header_raw + data


_VALID = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MUTATIONS = ["none", "offset", "shape", "dtype", "swap", "drop", "data", "header_len", "metadata"]


@st.composite
def near_valid_files(draw) -> tuple[str, bytes]:
    """A correct safetensors file of a few tensors, then (usually) exactly one thing made wrong."""
    names = draw(st.lists(st.sampled_from(_KEYS) | st.text(min_size=1, max_size=6), max_size=4, unique=True))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        code = draw(st.sampled_from(sorted(_VALID)))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        nbytes = _VALID[code] * math.prod(shape)
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data = draw(st.binary(min_size=offset, max_size=offset))
    if any(header[n]["dtype"] == "BOOL" for n in names):
        data = bytes(b & 1 for b in data)  # bool tensors hold 0 or 1
    mutation = draw(st.sampled_from(_MUTATIONS))
    length_delta = 0
    entries = [header[n] for n in names]
    if mutation == "offset" and entries:
        entry = draw(st.sampled_from(entries))
        entry["data_offsets"][draw(st.integers(0, 1))] += draw(st.sampled_from([-9, -1, 1, 3, 8, 2**40, -(2**40)]))
    elif mutation == "shape" and entries:
        entry = draw(st.sampled_from(entries))
        entry["shape"] = draw(st.lists(st.integers(-1, 6), max_size=3))
    elif mutation == "dtype" and entries:
        draw(st.sampled_from(entries))["dtype"] = draw(st.sampled_from([*_VALID, "Q4", "", "f32", 4, None]))
    elif mutation == "swap" and len(entries) >= 2:
        a, b = draw(st.permutations(entries))[:2]
        a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
    elif mutation == "drop" and names:
        del header[draw(st.sampled_from(names))]
    elif mutation == "data":
        delta = draw(st.sampled_from([-1, 1, 8]))
        data = data[:delta] if delta < 0 else data + bytes(delta)
    elif mutation == "header_len":
        length_delta = draw(st.sampled_from([-1, 1, 7, 2**40]))
    elif mutation == "metadata":
        header["__metadata__"] = draw(any_json)
    else:
        mutation = "none"
    return mutation, _safetensors_bytes(json.dumps(header).encode(), data, length_delta)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


@FUZZ
@given(case=near_valid_files())
def test_near_valid_safetensors_agree_with_the_reference_reader(corpus, case):
    """What we accept, the reference ``safetensors`` package reads to the same tensors; and an
    undamaged file is always accepted."""
    mutation, blob = case
    path = corpus.work / "near.safetensors"
    path.write_bytes(blob)
    try:
        reader = SafetensorsReader.open(path)
    except CheckpointError as exc:
        assert mutation != "none", f"a valid file was refused: {exc}"
        return
    reference = safetensors.torch.load_file(str(path))
    with reader:
        assert sorted(reader.tensors) == sorted(reference)
        for name, expected in reference.items():
            ours = reader.read(name)
            assert ours.dtype == expected.dtype and ours.shape == expected.shape, name
            assert torch.equal(_bits(ours), _bits(expected)), name  # bitwise: NaN payloads included
    with contextlib.suppress(CheckpointError):
        Booster().load_model(MLPWithBuffers(), path)


@FUZZ
@given(
    header=headers,
    data_len=st.integers(0, 200),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 7, 2**40]),
)
def test_any_safetensors_header_reads_or_raises_checkpoint_error(corpus, header, data_len, length_delta):
    path = corpus.work / "fuzz.safetensors"
    path.write_bytes(_safetensors_bytes(json.dumps(header).encode(), bytes(data_len), length_delta))
    try:
        reader = SafetensorsReader.open(path)
    except CheckpointError:
        return
    with reader:
        # A header that was accepted must describe the file exactly: every tensor readable, in bounds.
        for name in list(reader.tensors):
            info = reader.info(name)
            assert 0 <= info.start <= info.end <= path.stat().st_size
            assert reader.read(name).shape == info.shape
    with contextlib.suppress(CheckpointError):
        Booster().load_model(MLPWithBuffers(), path)


@FUZZ
@given(raw=st.binary(max_size=96))
def test_random_bytes_as_safetensors_raise_checkpoint_error(corpus, raw):
    path = corpus.work / "random.safetensors"
    path.write_bytes(raw)
    try:
        Booster().load_model(MLPWithBuffers(), path)
    except CheckpointError as exc:
        assert "random.safetensors" in str(exc)
