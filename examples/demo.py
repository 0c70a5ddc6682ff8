"""The main job: train a small model for a few steps, save it sharded, load it into a fresh
model and check that every tensor matches. Exits non-zero on any difference."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ckptio import Booster


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.GELU(), nn.Linear(256, 10))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    args = parser.parse_args()

    torch.manual_seed(0)
    booster = Booster()
    model, optimizer, *_ = booster.boost(make_model(), torch.optim.AdamW(make_model().parameters()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randn(512, 64)
    labels = torch.randint(0, 10, (512,))
    for _step in range(args.steps):
        idx = torch.randint(0, 512, (32,))
        loss = nn.functional.cross_entropy(model(data[idx]), labels[idx])
        optimizer.zero_grad()
        booster.backward(loss, optimizer)
        optimizer.step()
    print(f"trained {args.steps} steps, final loss {loss.item():.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "model"
        start = time.perf_counter()
        booster.save_model(model, out, shard=True, use_safetensors=True, size_per_shard=0.05)
        saved = time.perf_counter() - start
        files = sorted(p.name for p in Path(out).iterdir())
        fresh = make_model()
        start = time.perf_counter()
        booster.load_model(fresh, out)
        loaded = time.perf_counter() - start
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
        print(f"saved {len(files)} files to {out} in {saved:.3f}s, loaded in {loaded:.3f}s")
        print("weights match after reload:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
