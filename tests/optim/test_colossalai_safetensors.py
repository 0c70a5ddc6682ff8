"""ColossalAI 0.5's safetensors optimizer files (what it writes with ``use_async=True``) load, and the
one file we write for ``save_optimizer(..., "x.safetensors")`` is that layout, so each side loads the
other's.

The fixtures re-implement ColossalAI's layout (colossalai/utils/safetensors.py
``_flatten_optim_state_dict`` + ``prepare``; checkpoint_io/general_checkpoint_io.py and utils.py for
names and the index): keys ``state.<id>.<state name>``; every value that is not a tensor (the param
groups, a Python scalar) is a pickle inside a 1-D uint8 tensor, and ``__metadata__["non_tensor_keys"]``
lists those keys as a JSON string; ``None`` entries are dropped. Sharded: ``optimizer-0000N.safetensors``
(the same keys, no ``param_groups``), ``optimizer.safetensors.index.json`` (ids as keys, ``total_size``
in MiB, ``metadata.param_groups`` naming the ``torch.save`` group file ``pytorch_optim_group.bin``).
"""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import safetensors
import torch
from tests.optim.test_colossalai_layout import expected_state, groups, model_and_optimizer

from ckptio import Booster, CheckpointError, UnsafeCheckpointError
from ckptio.tools import inspect_checkpoint, verify_path

_CODES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint8: "U8", torch.bfloat16: "BF16"}


def _pickled(value) -> torch.Tensor:
    """ColossalAI's ``_object_to_tensor``: the pickle's bytes as a 1-D uint8 tensor."""
    return torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)


def colossal_flatten(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict | None]:
    states = state_dict.get("state", state_dict)  # a shard is {id: entries}
    flat, non_tensor = {}, []
    for pid, entries in states.items():
        for name, value in entries.items():
            if value is None:
                continue
            key = f"state.{pid}.{name}"
            if not isinstance(value, torch.Tensor):
                non_tensor.append(key)
                value = _pickled(value)
            flat[key] = value
    if "param_groups" in state_dict:
        flat["param_groups"] = _pickled(state_dict["param_groups"])
        non_tensor.append("param_groups")
    return flat, ({"non_tensor_keys": non_tensor} if non_tensor else None)


def colossal_write_safetensors(path, flat: dict[str, torch.Tensor], metadata: dict | None) -> None:
    """ColossalAI's ``prepare`` + writer: metadata values JSON-encoded, tensors in dict order."""
    header: dict = {"__metadata__": {"format": "pt", **{k: json.dumps(v) for k, v in (metadata or {}).items()}}}
    offset = 0
    for name, tensor in flat.items():
        n = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    body = json.dumps(header).encode("utf-8")
    body += b" " * ((8 - len(body) % 8) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(body)) + body)
        for tensor in flat.values():
            fh.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def colossal_load_flat(path) -> dict:
    """ColossalAI's ``load_flat``: safetensors' own reader, then the pickles, then the nesting."""
    with safetensors.safe_open(path, framework="pt") as fh:
        metadata = fh.metadata()
        flat = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    non_tensor = json.loads(metadata["non_tensor_keys"]) if metadata and "non_tensor_keys" in metadata else []
    flat = {k: pickle.loads(v.numpy().tobytes()) if k in non_tensor else v for k, v in flat.items()}
    out: dict = {}
    states = out
    if "param_groups" in flat:
        out["param_groups"] = flat.pop("param_groups")
        states = out["state"] = {}
    for key, value in flat.items():
        parts = key.split(".")
        assert len(parts) == 3 and parts[0] == "state"
        states.setdefault(int(parts[1]), {})[parts[2]] = value
    return out


def full_state_dict() -> dict:
    return {"state": expected_state(), "param_groups": groups()}


def build_sharded(folder, *, prefix: str = "") -> None:
    folder.mkdir()
    p = f".{prefix}" if prefix else ""
    state = expected_state()
    state[3]["count"] = 3  # a Python value: pickled, listed in this shard's non_tensor_keys
    weight_map = {}
    for i, ids in enumerate([[0, 1, 2], [3]]):
        name = f"optimizer{p}-{i + 1:05d}.safetensors"
        colossal_write_safetensors(folder / name, *colossal_flatten({pid: state[pid] for pid in ids}))
        weight_map.update({str(pid): name for pid in ids})
    torch.save(groups(), folder / f"pytorch_optim_group{p}.bin")
    index = {
        "metadata": {"param_groups": f"pytorch_optim_group{p}.bin", "total_size": 0.0003},
        "weight_map": weight_map,
    }
    (folder / f"optimizer.safetensors.index{p}.json").write_text(json.dumps(index, indent=2) + "\n")


def assert_loaded(optimizer, *, extra: dict | None = None) -> None:
    loaded = optimizer.state_dict()
    for pid, entries in expected_state().items():
        for name, value in entries.items():
            got = loaded["state"][pid][name]
            assert got.dtype == value.dtype and torch.equal(got, value), (pid, name)
    for pid, entries in (extra or {}).items():
        for name, value in entries.items():
            assert loaded["state"][pid][name] == value
    for got, want in zip(loaded["param_groups"], groups()):
        assert got == want


def test_one_file_colossalai_wrote_loads(tmp_path):
    sd = full_state_dict()
    sd["state"][1]["count"] = 5  # a non-tensor state value, pickled
    colossal_write_safetensors(tmp_path / "optimizer.safetensors", *colossal_flatten(sd))
    model, optimizer = model_and_optimizer()
    booster = Booster()
    booster.boost(model, optimizer)
    booster.load_optimizer(optimizer, tmp_path / "optimizer.safetensors")
    assert_loaded(optimizer, extra={1: {"count": 5}})


@pytest.mark.parametrize("prefix", ["", "ema"])
def test_sharded_colossalai_wrote_loads(tmp_path, prefix):
    build_sharded(tmp_path / "optim", prefix=prefix)
    model, optimizer = model_and_optimizer()
    booster = Booster()
    booster.boost(model, optimizer)
    booster.load_optimizer(optimizer, tmp_path / "optim")  # the folder: its one index is found
    assert_loaded(optimizer, extra={3: {"count": 3}})
    assert inspect_checkpoint(tmp_path / "optim")["layout"] == "colossalai"
    assert verify_path(tmp_path / "optim")[1] == []
    p = f".{prefix}" if prefix else ""
    model, optimizer = model_and_optimizer()
    booster.boost(model, optimizer)
    booster.load_optimizer(optimizer, tmp_path / "optim" / f"optimizer.safetensors.index{p}.json")
    assert_loaded(optimizer, extra={3: {"count": 3}})


def test_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    sd = full_state_dict()
    flat, metadata = colossal_flatten(sd)
    flat["param_groups"] = _pickled([Boom()])
    colossal_write_safetensors(tmp_path / "optimizer.safetensors", flat, metadata)
    model, optimizer = model_and_optimizer()
    before = optimizer.state_dict()
    with pytest.raises(UnsafeCheckpointError, match="param_groups") as info:
        Booster().load_optimizer(optimizer, tmp_path / "optimizer.safetensors")
    assert "optimizer.safetensors" in str(info.value)
    assert not (tmp_path / "pwned").exists()
    assert optimizer.state_dict() == before


def test_malformed_flat_keys_are_refused(tmp_path):
    flat, metadata = colossal_flatten(full_state_dict())
    flat["state.x.exp_avg"] = torch.zeros(2)
    colossal_write_safetensors(tmp_path / "optimizer.safetensors", flat, metadata)
    model, optimizer = model_and_optimizer()
    with pytest.raises(CheckpointError, match=r"state\.x\.exp_avg"):
        Booster().load_optimizer(optimizer, tmp_path / "optimizer.safetensors")


def _stepped():
    model, optimizer = model_and_optimizer()
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_save_optimizer_to_a_safetensors_name_writes_colossalai_one_file_layout(tmp_path, use_async):
    model, optimizer = _stepped()
    booster = Booster()
    booster.boost(model, optimizer)
    path = tmp_path / "opt.safetensors"
    booster.save_optimizer(optimizer, path, use_async=use_async)
    booster.wait()
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    assert header["__metadata__"]["format"] == "pt"
    assert json.loads(header["__metadata__"]["non_tensor_keys"]) == ["param_groups"]
    assert set(header) - {"__metadata__"} == {"param_groups"} | {
        f"state.{pid}.{name}" for pid in range(4) for name in ("step", "exp_avg", "exp_avg_sq")
    }
    # ColossalAI's reader gives back exactly optimizer.state_dict()
    theirs = colossal_load_flat(path)
    want = optimizer.state_dict()
    assert theirs["param_groups"] == want["param_groups"]
    for pid, entries in want["state"].items():
        for name, value in entries.items():
            assert torch.equal(theirs["state"][pid][name], value)
    # the command line's view of it: an optimizer in this layout, readable
    assert inspect_checkpoint(path)["layout"] == "safetensors"
    assert verify_path(path)[1] == []
    # ... and ours loads it, into a fresh optimizer
    model2, optimizer2 = model_and_optimizer(seed=1)
    booster.boost(model2, optimizer2)
    booster.load_optimizer(optimizer2, path)
    got = optimizer2.state_dict()
    assert got["param_groups"] == want["param_groups"]
    for pid, entries in want["state"].items():
        for name, value in entries.items():
            assert torch.equal(got["state"][pid][name], value)


def test_one_file_safetensors_refuses_state_it_cannot_hold(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.LBFGS(model.parameters(), history_size=3)

    def closure():
        optimizer.zero_grad()
        loss = model(torch.randn(4, 3)).pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with pytest.raises(CheckpointError, match="parameter 0 is a list holding tensors") as info:
        Booster().save_optimizer(optimizer, tmp_path / "lbfgs.safetensors")
    assert "lbfgs.safetensors" in str(info.value)
    assert not (tmp_path / "lbfgs.safetensors").exists()
    Booster().save_optimizer(optimizer, tmp_path / "lbfgs.bin")  # a torch file holds it
