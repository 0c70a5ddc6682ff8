"""Folders written by ``torch.distributed.checkpoint.save`` (DCP) in one process: model and optimizer
loads (every layout torch and torchtitan write), and ``ckptio convert`` into a folder ``transformers``
loads."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tests.helpers import assert_same_state, randomize, tiny_llama
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from ckptio import Booster, load_state_dict
from ckptio.errors import CheckpointError, CheckpointNotFoundError, StateMismatchError
from ckptio.tools import convert as convert_module
from ckptio.tools import convert_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def _adamw(model: nn.Module) -> torch.optim.AdamW:
    first, *rest = model.children()
    groups = [{"params": list(first.parameters()), "lr": 0.01}]
    groups.append({"params": [p for m in rest for p in m.parameters()], "lr": 0.003, "betas": (0.8, 0.9)})
    return torch.optim.AdamW(groups, weight_decay=0.1)


def _train(model, optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(4, 6, generator=gen)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _optimizer_state(optimizer) -> tuple[list, list]:
    sd = optimizer.state_dict()
    groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in sd["param_groups"]]
    return [sorted(entries.items()) for _, entries in sorted(sd["state"].items())], groups


def _assert_same_optimizer(a, b) -> None:
    (sa, ga), (sb, gb) = _optimizer_state(a), _optimizer_state(b)
    assert ga == gb
    assert len(sa) == len(sb)
    for ea, eb in zip(sa, sb):
        assert [k for k, _ in ea] == [k for k, _ in eb]
        for (_, va), (_, vb) in zip(ea, eb):
            assert va.dtype == vb.dtype and torch.equal(va, vb)


@pytest.mark.parametrize("flat", [False, True], ids=["nested", "flat"])
@pytest.mark.parametrize("boosted", [True, False], ids=["named", "unnamed"])
def test_get_state_dict_checkpoint_loads_model_and_optimizer(tmp_path, flat, boosted):
    model, optimizer = _net(0), None
    optimizer = _adamw(model)
    _train(model, optimizer, 2)
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=flat))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "dcp")

    fresh = _net(5)
    fresh_optimizer = _adamw(fresh)
    booster = Booster()
    if boosted:  # parameters known by name; else matched by position
        fresh, fresh_optimizer, *_ = booster.boost(fresh, fresh_optimizer)
    assert booster.load_model(fresh, tmp_path / "dcp").ok
    booster.load_optimizer(fresh_optimizer, tmp_path / "dcp")
    assert_same_state(model, fresh)
    _assert_same_optimizer(optimizer, fresh_optimizer)
    _train(model, optimizer, 1, seed=3)  # and they train on identically
    _train(fresh, fresh_optimizer, 1, seed=3)
    assert_same_state(model, fresh)


def test_plain_model_state_dict_and_its_dtypes_load(tmp_path):
    """``dcp.save(state_dict)`` at the top level: every dtype, a 0-dim tensor, an empty one and a
    non-contiguous view (saved with its strides) read back exactly."""
    state = {
        "w": torch.randn(7, 5),
        "half": torch.randn(3, 4).to(torch.bfloat16),
        "steps": torch.arange(6),
        "mask": torch.rand(5) > 0.5,
        "f8": torch.randn(4, 2).to(torch.float8_e4m3fn),
        "u16": torch.arange(9).to(torch.uint16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "transposed": torch.randn(4, 6).t(),
    }
    dcp.save(state, checkpoint_id=tmp_path / "dcp")
    loaded = load_state_dict(tmp_path / "dcp")
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape, key
        as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (loaded[key], tensor)]
        assert torch.equal(*as_bytes), key  # bit for bit, whatever the dtype
    box = load_state_dict(tmp_path / "dcp", ["transposed"])["transposed"]
    assert torch.equal(box, state["transposed"])


def test_optimizer_of_another_model_is_refused_before_loading(tmp_path):
    model = _net(0)
    optimizer = _adamw(model)
    _train(model, optimizer, 1)
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, optimizer))), checkpoint_id=tmp_path / "dcp")
    other = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 4))  # last layer: 4 outputs
    booster = Booster()
    other, other_optimizer, *_ = booster.boost(other, _adamw(other))
    with pytest.raises(StateMismatchError, match=r"2\.weight: model has float32\[4, 5\], checkpoint has float32\[3, 5"):
        booster.load_model(other, tmp_path / "dcp")
    with pytest.raises(StateMismatchError, match="2.weight: state 'exp_avg' has shape") as err:
        booster.load_optimizer(other_optimizer, tmp_path / "dcp")
    assert str(tmp_path / "dcp" / ".metadata") in str(err.value)
    assert other_optimizer.state_dict()["state"] == {}  # nothing was loaded


def test_torchtitan_parent_folder_names_the_step_folders(tmp_path):
    model = _net(0)
    for step in (10, 200):
        dcp.save(model.state_dict(), checkpoint_id=tmp_path / "checkpoint" / f"step-{step}")
    with pytest.raises(CheckpointNotFoundError, match=r"torchtitan checkpoints \(step-10, step-200\).*step-200$"):
        Booster().load_model(_net(1), tmp_path / "checkpoint")
    fresh = _net(1)
    assert Booster().load_model(fresh, tmp_path / "checkpoint" / "step-200" / ".metadata").ok  # the file works too
    assert_same_state(model, fresh)


def test_torchtitan_checkpoint_manager_step_folder_loads(tmp_path):
    """torchtitan's own CheckpointManager writes the step folder (torchtitan is in the dev install)."""
    import torchtitan.components.checkpoint as checkpointer
    import torchtitan.components.optimizer as containers

    model = _net(0)
    groups = [
        containers.ParamGroupConfig(pattern=r"^0\.", optimizer_name="AdamW", optimizer_kwargs={"lr": 0.01}),
        containers.ParamGroupConfig(pattern=".", optimizer_name="AdamW", optimizer_kwargs={"lr": 0.003}),
    ]
    config = containers.OptimizersContainer.Config(param_groups=groups, implementation="for-loop")
    optimizers = containers.OptimizersContainer(config, model_parts=[model])
    _train(model, optimizers, 2)
    manager = checkpointer.CheckpointManager(
        checkpointer.CheckpointManager.Config(enable=True, folder="checkpoint", interval=1, keep_latest_k=0),
        dataloader=None,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=None,
        states={},
        sd_adapter=None,
        base_folder=str(tmp_path),
    )
    manager.save(curr_step=2)
    manager.close()

    fresh = _net(5)
    fresh_optimizer = torch.optim.AdamW([{"params": fresh[0].parameters()}, {"params": fresh[1:].parameters()}])
    booster = Booster()
    fresh, fresh_optimizer, *_ = booster.boost(fresh, fresh_optimizer)
    assert booster.load_model(fresh, tmp_path / "checkpoint" / "step-2").ok
    booster.load_optimizer(fresh_optimizer, tmp_path / "checkpoint" / "step-2")
    assert_same_state(model, fresh)
    _assert_same_optimizer(optimizers.optimizers[0], fresh_optimizer)


def test_convert_streams_into_a_folder_transformers_loads(tmp_path, monkeypatch):
    """A model saved under other names (``{"model": ...}`` with a ``decoder.`` prefix) converts
    with a key map into a Hugging Face folder; tensors stream through in small pieces."""
    transformers = pytest.importorskip("transformers")
    model = randomize(tiny_llama())
    renamed = {k.replace("model.", "decoder.", 1): v for k, v in model.state_dict().items()}
    dcp.save({"model": renamed, "step": 7}, checkpoint_id=tmp_path / "dcp")
    monkeypatch.setattr(convert_module, "PIECE_BYTES", 1000)  # every matrix in several pieces
    key_map = convert_module.key_map_from_expressions([r"s/^decoder\./model./", "/inv_freq$/d"])
    result = convert_checkpoint(tmp_path / "dcp", tmp_path / "hf", size_per_shard=0.05, key_map=key_map)
    assert result["tensors"] == len(renamed)
    model.config.save_pretrained(tmp_path / "hf")  # the DCP folder has no config: the user brings it
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert_same_state(model, loaded)
    with pytest.raises(CheckpointError, match=r"key_map renames both 'decoder\.layers\.0\..*' to"):
        convert_checkpoint(tmp_path / "dcp", tmp_path / "hf2", key_map=lambda k: k.replace(".1.", ".0."))
    assert not (tmp_path / "hf2").exists()


def test_convert_copies_a_source_only_with_its_model_tensors(tmp_path):
    model = _net(0)
    optimizer = _adamw(model)
    _train(model, optimizer, 1)
    dcp.save(dict(zip(("model", "optim"), get_state_dict(model, optimizer))), checkpoint_id=tmp_path / "dcp")
    result = convert_checkpoint(tmp_path / "dcp", tmp_path / "out.safetensors")
    assert result["tensors"] == len(model.state_dict())
    assert list(load_state_dict(tmp_path / "out.safetensors")) == list(model.state_dict())
