"""Every torch optimizer round-trips in every layout: the loaded ``state_dict()`` equals the saved
one (tensors with ``torch.equal``, same dtypes, same Python types) and training goes on bit for bit.

Adafactor keeps factored ``row_var``/``col_var`` whose shapes differ from the parameter's; LBFGS
keeps lists of flat tensors (``old_dirs``...) on the first parameter only; both used to be refused
on load, and LBFGS on a model of more than 4,096 parameters could not be saved sharded at all.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptio import Booster, CheckpointFormatError, StateMismatchError
from ckptio.training import load_checkpoint, save_checkpoint

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "adadelta": lambda p: torch.optim.Adadelta(p),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "asgd": lambda p: torch.optim.ASGD(p, lr=1e-2, t0=1),  # t0=1: the average ``ax`` moves
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True),
    "rprop": lambda p: torch.optim.Rprop(p, lr=1e-3),
    "adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2),
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.5, history_size=4, max_iter=3),
}
LAYOUTS = ["single", "ckptio", "colossalai", "training", "training-colossalai"]
SAVED_STEPS, MORE_STEPS = 3, 2


def make_model(kind: str, seed: int = 0) -> nn.Module:
    """Tiny, except for LBFGS: 4,420 parameters, so each of its flat history tensors is larger
    than the 4,096 elements JSON may hold (and every dim-0 size is even, for FSDP2 on 2 ranks)."""
    torch.manual_seed(seed)
    if kind == "lbfgs":
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def in_features(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Linear | _Cube)).in_features


def train(model: nn.Module, optimizer, steps: range) -> None:
    """The same batches on every rank (LBFGS's control flow follows the local loss)."""
    for step in steps:
        x = torch.randn(4, in_features(model), generator=torch.Generator().manual_seed(100 + step))

        def closure(x=x):
            optimizer.zero_grad()
            loss = model(x).sin().pow(2).mean()
            loss.backward()
            return loss

        optimizer.step(closure)


def assert_same_value(a, b, where: str = "") -> None:
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_value(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same_value(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, where


def assert_same_state_dict(expected: dict, got: dict) -> None:
    assert got["param_groups"] == expected["param_groups"]
    assert sorted(got["state"]) == sorted(expected["state"])
    for pid, entries in expected["state"].items():
        assert sorted(got["state"][pid]) == sorted(entries), pid
        for name, value in entries.items():
            assert_same_value(value, got["state"][pid][name], f"state[{pid}].{name}")


def save(booster: Booster, model, optimizer, tmp_path: Path, layout: str, use_async: bool) -> Path:
    io = booster.checkpoint_io
    io.optimizer_layout = "colossalai" if layout.endswith("colossalai") else "ckptio"
    if layout == "single":
        path = tmp_path / "optim.bin"
        booster.save_optimizer(optimizer, path, use_async=use_async)
    elif layout in ("ckptio", "colossalai"):
        path = tmp_path / "optim"
        booster.save_optimizer(optimizer, path, shard=True, size_per_shard=0.01, use_async=use_async)
    else:
        path = save_checkpoint(tmp_path, booster, model, optimizer, None, 0, 1, 1, use_async=use_async)
    return path


def load(booster: Booster, model, optimizer, path: Path, layout: str) -> None:
    if layout.startswith("training"):
        load_checkpoint(path, booster, model, optimizer, None, restore_rng=False)
    else:
        booster.load_optimizer(optimizer, path)


def run_and_resume(kind: str, tmp_path: Path, save_fn, load_fn) -> None:
    """Train, save, keep training; then a fresh model + optimizer loads and trains the same steps."""
    booster = Booster()
    model = make_model(kind)
    optimizer = OPTIMIZERS[kind](model.parameters())
    model, optimizer, *_ = booster.boost(model, optimizer)
    train(model, optimizer, range(SAVED_STEPS))
    weights = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(optimizer.state_dict())
    path = save_fn(booster, model, optimizer)
    train(model, optimizer, range(SAVED_STEPS, SAVED_STEPS + MORE_STEPS))  # goes on while an async save writes
    booster.wait()

    model2 = make_model(kind, seed=5)
    optimizer2 = OPTIMIZERS[kind](model2.parameters())
    model2, optimizer2, *_ = booster.boost(model2, optimizer2)
    model2.load_state_dict(weights)
    load_fn(booster, model2, optimizer2, path)
    assert_same_state_dict(saved, optimizer2.state_dict())
    train(model2, optimizer2, range(SAVED_STEPS, SAVED_STEPS + MORE_STEPS))
    for (name, p), q in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_round_trip_and_resume(tmp_path, kind, layout, use_async):
    run_and_resume(
        kind,
        tmp_path,
        lambda booster, model, optimizer: save(booster, model, optimizer, tmp_path, layout, use_async),
        lambda booster, model, optimizer, path: load(booster, model, optimizer, path, layout),
    )


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_plain_torch_save_file_loads(tmp_path, kind):
    def save_plain(booster, model, optimizer):
        torch.save(optimizer.state_dict(), tmp_path / "plain.pt")
        return tmp_path / "plain.pt"

    run_and_resume(
        kind, tmp_path, save_plain, lambda booster, model, optimizer, path: booster.load_optimizer(optimizer, path)
    )


def test_lbfgs_history_goes_to_safetensors_by_position(tmp_path):
    booster = Booster()
    model = make_model("lbfgs")
    optimizer = OPTIMIZERS["lbfgs"](model.parameters())
    model, optimizer, *_ = booster.boost(model, optimizer)
    train(model, optimizer, range(SAVED_STEPS))
    booster.save_optimizer(optimizer, tmp_path / "o", shard=True)
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert all(n.endswith((".json", ".safetensors")) for n in names)
    index = json.loads((tmp_path / "o" / "optimizer.index.json").read_text())
    history = len(optimizer.state_dict()["state"][0]["old_dirs"])
    assert history == 4
    for i in range(history):
        assert f"0.weight/old_dirs/{i}" in index["weight_map"] and f"0.weight/old_stps/{i}" in index["weight_map"]
    assert "0.weight/d" in index["weight_map"] and "0.weight/prev_flat_grad" in index["weight_map"]
    description = index["optimizer"]
    assert index["metadata"]["format_version"] == description["format_version"] == 2  # nested references
    old_dirs = description["state"]["0.weight"]["old_dirs"]
    assert old_dirs[1] == {"__ref__": {"key": "0.weight/old_dirs/1", "dtype": "float32", "shape": [4420]}}
    assert "__tensor__" in description["state"]["0.weight"]["ro"][0]  # scalars stay in JSON, like step
    assert len(json.dumps(description)) < 20_000  # no tensor data in JSON


class _Exotic(torch.optim.Optimizer):
    """Not one of torch's: state nested in dicts and tuples, keys with '/' and '%', None, a
    state tensor shaped unlike its parameter, a complex scalar (no exact JSON form; torch casts
    every state tensor to the parameter's dtype on load, except under the key "step")."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["a/b"] = {"x/y": [torch.zeros_like(p), None], "%2F": (torch.ones(3), 1.5, True)}
                    st["step"] = torch.zeros((), dtype=torch.complex64)
                    st["count"] = 0
                st["a/b"]["x/y"][0].add_(p.grad)
                st["a/b"]["%2F"][0].mul_(0.5)
                st["step"] += 1j
                st["count"] += 1
                p.sub_(group["lr"] * st["a/b"]["x/y"][0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_foreign_optimizer_with_nested_state(tmp_path, layout):
    OPTIMIZERS["exotic"] = _Exotic
    try:
        run_and_resume(
            "exotic",
            tmp_path,
            lambda booster, model, optimizer: save(booster, model, optimizer, tmp_path, layout, False),
            lambda booster, model, optimizer, path: load(booster, model, optimizer, path, layout),
        )
    finally:
        del OPTIMIZERS["exotic"]
    if layout == "ckptio":
        index = json.loads((tmp_path / "optim" / "optimizer.index.json").read_text())
        assert "0.weight/a%2Fb/x%2Fy/0" in index["weight_map"]  # '/' and '%' escaped inside a segment
        assert "0.weight/a%2Fb/%252F/0" in index["weight_map"]
        assert "0.weight/step" in index["weight_map"]  # complex: no exact JSON form, so safetensors


# ----------------------------------------------------------------------------- early refusal
@pytest.mark.parametrize("layout", ["single", "plain", "ckptio", "colossalai"])
@pytest.mark.parametrize("kind", ["adam", "adafactor", "lbfgs"])
def test_checkpoint_of_other_shapes_is_refused_before_anything_changes(tmp_path, kind, layout):
    booster = Booster()
    model = make_model(kind)
    optimizer = OPTIMIZERS[kind](model.parameters())
    model, optimizer, *_ = booster.boost(model, optimizer)
    train(model, optimizer, range(SAVED_STEPS))
    if layout == "plain":
        path = tmp_path / "plain.pt"
        torch.save(optimizer.state_dict(), path)
    else:
        path = save(booster, model, optimizer, tmp_path, layout, False)

    torch.manual_seed(1)
    first, last = model[0], model[2]
    width = first.out_features + 1  # every parameter but the last bias changes shape
    other = nn.Sequential(nn.Linear(first.in_features, width), nn.Tanh(), nn.Linear(width, last.out_features))
    optimizer2 = OPTIMIZERS[kind](other.parameters())
    booster.boost(other, optimizer2)
    train(other, optimizer2, range(1))
    before = copy.deepcopy(optimizer2.state_dict())
    with pytest.raises(StateMismatchError, match=r"0\.weight") as info:
        booster.load_optimizer(optimizer2, path)
    assert str(path.name) in str(info.value)
    assert_same_state_dict(before, optimizer2.state_dict())  # nothing changed


def test_lbfgs_checkpoint_for_another_parameter_count_names_the_state(tmp_path):
    booster = Booster()
    model = make_model("lbfgs")
    optimizer = OPTIMIZERS["lbfgs"](model.parameters())
    booster.boost(model, optimizer)
    train(model, optimizer, range(2))
    torch.save(optimizer.state_dict(), tmp_path / "plain.pt")
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4, bias=False))
    optimizer2 = OPTIMIZERS["lbfgs"](other.parameters())
    with pytest.raises(StateMismatchError, match=r"param group 0 has 4 parameters in the checkpoint, 3"):
        booster.load_optimizer(optimizer2, tmp_path / "plain.pt")  # by position: three parameters vs four
    other2 = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4, bias=False), nn.Linear(1, 1, bias=False))
    optimizer3 = OPTIMIZERS["lbfgs"](other2.parameters())  # four parameters, of the same shapes but the last
    with pytest.raises(StateMismatchError, match=r"parameter 0 .*'d' has shape \[4420\].*LBFGS keeps \[4417\]"):
        booster.load_optimizer(optimizer3, tmp_path / "plain.pt")
    assert optimizer3.state_dict()["state"] == {}


def test_non_string_state_name_is_refused_at_save(tmp_path):
    model = make_model("adam")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.state[model[0].weight][3] = torch.ones(2)
    with pytest.raises(CheckpointFormatError, match=r"state name 3 of '0'.*not a string"):
        Booster().save_optimizer(optimizer, tmp_path / "o", shard=True)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- several ranks
class _Cube(nn.Module):
    """A 3-D weight: Adafactor factors its last two dims, which FSDP2 (dim 0) does not shard,
    so torch's Adafactor steps on FSDP2 here (on a sharded matrix it fails inside torch)."""

    in_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6, 8) / 8)
        self.b = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return torch.einsum("ijk,bk->bij", self.w, x).tanh().sum(-1) + self.b


DIST_LAYOUTS = [
    (layout, use_async) for layout in ("single", "ckptio", "colossalai", "training") for use_async in (0, 1)
]


def _gathered(value):
    """A state value with every DTensor (at any depth) gathered into a plain full tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().clone()  # a replicated one may share memory with the live state
    if isinstance(value, list | tuple):
        return type(value)(_gathered(v) for v in value)
    if isinstance(value, dict):
        return {k: _gathered(v) for k, v in value.items()}
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _full_state_dict(optimizer) -> dict:
    sd = optimizer.state_dict()
    return {"state": _gathered(sd["state"]), "param_groups": copy.deepcopy(sd["param_groups"])}


def _full_params(model) -> list[torch.Tensor]:
    return [_gathered(p) for p in model.parameters()]


def _boosted(kind: str, plugin: str, seed: int):
    from ckptio.plugins import TorchDDPPlugin, TorchFSDPPlugin

    if kind == "adafactor-cube":
        torch.manual_seed(seed)
        model = _Cube()
    else:
        model = make_model(kind, seed)
    optimizer = OPTIMIZERS[kind.removesuffix("-cube")](model.parameters())
    booster = Booster(plugin=TorchDDPPlugin() if plugin == "ddp" else TorchFSDPPlugin())
    model, optimizer, *_ = booster.boost(model, optimizer)
    return booster, model, optimizer


def _dist_save(kind: str, plugin: str, folder: Path) -> None:
    booster, model, optimizer = _boosted(kind, plugin, 0)
    train(model, optimizer, range(SAVED_STEPS))
    reference = {"weights": _full_params(model), "optimizer": _full_state_dict(optimizer)}
    first = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert len(first["old_dirs" if kind == "lbfgs" else "row_var"]) > 0  # the optimizer really stepped
    for layout, use_async in DIST_LAYOUTS:
        save(booster, model, optimizer, folder / f"{layout}-{use_async}", layout, bool(use_async))
    train(model, optimizer, range(SAVED_STEPS, SAVED_STEPS + MORE_STEPS))
    booster.wait()
    reference["final"] = _full_params(model)
    if torch.distributed.get_rank() == 0:
        torch.save(reference, folder / "reference.pt")


def _dist_load(kind: str, plugin: str, folder: Path) -> dict[str, str]:
    """Every layout loads into a fresh run that then trains on; problems by layout."""
    from ckptio.engine.optimizer import place_like

    reference = torch.load(folder / "reference.pt", weights_only=True)
    problems = {}
    for layout, use_async in DIST_LAYOUTS:
        booster, model, optimizer = _boosted(kind, plugin, 5)
        with torch.no_grad():
            for p, full in zip(model.parameters(), reference["weights"]):
                p.copy_(place_like(full, p))
        path = folder / f"{layout}-{use_async}"
        path = {"single": path / "optim.bin", "training": path / "epoch-0_step-1"}.get(layout, path / "optim")
        try:
            load(booster, model, optimizer, path, layout)
            assert_same_state_dict(reference["optimizer"], _full_state_dict(optimizer))
            train(model, optimizer, range(SAVED_STEPS, SAVED_STEPS + MORE_STEPS))
            for i, (p, q) in enumerate(zip(_full_params(model), reference["final"])):
                assert torch.equal(p, q), f"parameter {i} differs after training on"
        except AssertionError as exc:
            problems[f"{layout}-{use_async}"] = f"{exc!r}"
    return problems


def _refused_layout(folder: Path) -> str:
    """FSDP2 state that a load could not lay out again (sharded, not shaped like its parameter)
    is refused at save, naming the optimizer and the entry, and nothing is written."""
    from torch.distributed.tensor import Shard, distribute_tensor

    booster, model, optimizer = _boosted("adam", "fsdp", 0)
    train(model, optimizer, range(1))
    weight = optimizer.param_groups[0]["params"][0]
    optimizer.state[weight]["extra"] = [None, distribute_tensor(torch.ones(4, 2), weight.device_mesh, [Shard(0)])]
    messages = []
    for layout in ("single", "ckptio"):
        with pytest.raises(CheckpointFormatError) as info:
            save(booster, model, optimizer, folder / layout, layout, False)
        assert not (folder / layout).exists()
        messages.append(str(info.value))
    return "\n".join(messages)


@pytest.mark.dist
def test_lbfgs_and_adafactor_on_two_ranks(tmp_path):
    """DDP: LBFGS and Adafactor in every layout, sync and async. FSDP2: LBFGS (its flat state
    is replicated) and Adafactor on a 3-D weight (factored state replicated, the rest sharded)."""
    from tests.dist.harness import run_ranks

    cases = [("lbfgs", "ddp"), ("adafactor", "ddp"), ("lbfgs", "fsdp"), ("adafactor-cube", "fsdp")]

    def scenario(ctx):
        out = {}
        for kind, plugin in cases:
            folder = tmp_path / f"{kind}-{plugin}"
            ctx.phase(2, f"save-{kind}-{plugin}", lambda k=kind, p=plugin, f=folder: _dist_save(k, p, f))
            out[f"{kind}-{plugin}"] = ctx.phase(
                2, f"load-{kind}-{plugin}", lambda k=kind, p=plugin, f=folder: _dist_load(k, p, f)
            )
        out["refused"] = ctx.phase(2, "refused", lambda: _refused_layout(tmp_path / "refused"))
        return out

    results = run_ranks(scenario, 2, tmp_path)
    for rank, out in enumerate(results):
        for case in cases:
            assert out[f"{case[0]}-{case[1]}"] == {}, (rank, case, out[f"{case[0]}-{case[1]}"])
        for message in out["refused"].splitlines():
            assert "Adam state 'extra'[1] of parameter '0.weight'" in message, message
            assert "shape [4, 2] placed [Shard(dim=0)]" in message and "nothing was saved" in message

    # a single process without a plugin loads what LBFGS saved on FSDP2 (its state is replicated)
    reference = torch.load(tmp_path / "lbfgs-fsdp" / "reference.pt", weights_only=True)
    for name in ("single-0/optim.bin", "ckptio-1/optim", "colossalai-0/optim"):
        model = make_model("lbfgs", 5)
        optimizer = OPTIMIZERS["lbfgs"](model.parameters())
        Booster().load_optimizer(optimizer, tmp_path / "lbfgs-fsdp" / name)
        assert_same_state_dict(reference["optimizer"], optimizer.state_dict())
