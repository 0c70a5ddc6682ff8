"""Small models for the multi-rank tests, with dimensions that do not divide by 3 or 4."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class UnevenNet(nn.Module):
    """Embedding 13x6, two blocks, head 5x6, a persistent buffer: dim-0 sizes are uneven
    over 2, 3 or 4 ranks, and at 4 ranks ``head.weight`` splits 2, 2, 1, 0 rows (an empty shard)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 6)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 5)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 5))

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x) * self.scale


def make_uneven(seed: int = 0) -> UnevenNet:
    torch.manual_seed(seed)
    return UnevenNet()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.state_dict()`` as a full plain tensor (collective for DTensors)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.full_tensor() if isinstance(v, DTensor) else v.detach().clone()
    return out


def diff_keys(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ in dtype, shape or any value (plus keys only on one side)."""
    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]):
            bad.append(k)
    return bad


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """AdamW with two param groups of different settings, built on the unsharded model."""
    rest = [p for n, p in model.named_parameters() if n != "emb.weight"]
    return torch.optim.AdamW(
        [
            {"params": [model.emb.weight], "lr": 0.01},
            {"params": rest, "lr": 0.003, "weight_decay": 0.2, "betas": (0.8, 0.9)},
        ]
    )


def train(model: nn.Module, optimizer, steps: int, rank: int, start: int = 0) -> list[float]:
    """A few steps on rank-dependent synthetic batches; returns the losses."""
    losses = []
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 * rank + step)
        idx = torch.randint(0, 13, (3, 4), generator=gen)
        loss = model(idx).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def full_optimizer_state(optimizer, model: nn.Module) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """``{"<param>/<state>": full tensor}`` and each group's settings (no params)."""
    from torch.distributed.tensor import DTensor

    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for sname, v in optimizer.state.get(p, {}).items():
                v = v.full_tensor() if isinstance(v, DTensor) else v
                out[f"{names[id(p)]}/{sname}"] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return out, groups
