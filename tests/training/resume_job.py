"""A small training job for the exact-resume tests: importable, and runnable as a fresh process.

``python resume_job.py --resume CKPT --steps N --out DIR`` loads ``CKPT`` with
``load_checkpoint``, trains up to global step ``N`` and writes ``DIR/losses.json`` (exact
float bits) and ``DIR/final.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckptio import Booster
from ckptio.training import StatefulDistributedSampler, load_checkpoint, save_checkpoint

BATCH = 8
SAMPLES = 48  # 6 steps per epoch


def build(seed: int = 0):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(SAMPLES, 10, generator=gen)
    dataset = TensorDataset(x, (x.sum(dim=1) > 0).long())
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))
    optimizer = torch.optim.AdamW(
        [{"params": [model[0].weight, model[3].weight]}, {"params": [model[0].bias, model[3].bias], "lr": 5e-3}],
        lr=1e-2,
        weight_decay=0.01,
    )
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=3),
            torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7),
        ],
        milestones=[3],
    )
    sampler = StatefulDistributedSampler(dataset, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, generator=torch.Generator())
    booster = Booster()
    model, optimizer, _, loader, scheduler = booster.boost(model, optimizer, None, loader, scheduler)
    return booster, model, optimizer, scheduler, sampler, loader


def train(total_steps: int, *, ckpt_dir: Path | None = None, save_at=(), resume_from: Path | None = None, **load_kw):
    """Returns ``(losses {global_step: float.hex()}, model, saved checkpoint paths)``."""
    booster, model, optimizer, scheduler, sampler, loader = build()
    epoch0, step0 = 0, 0
    if resume_from is not None:
        epoch0, step0, start = load_checkpoint(resume_from, booster, model, optimizer, scheduler, **load_kw)
        sampler.set_start_index(start)
    per_epoch = SAMPLES // BATCH
    global_step = epoch0 * per_epoch + step0
    losses, saved = {}, []
    model.train()
    epoch = epoch0
    while global_step < total_steps:
        sampler.set_epoch(epoch)
        step = step0 if epoch == epoch0 else 0
        for x, y in loader:
            x = x + torch.from_numpy(np.random.normal(0, 0.05, size=tuple(x.shape)).astype(np.float32))
            loss = nn.functional.cross_entropy(model(x), y) * (1 + 0.01 * random.random())
            optimizer.zero_grad()
            booster.backward(loss, optimizer)
            optimizer.step()
            scheduler.step()
            step += 1
            global_step += 1
            losses[global_step] = loss.item().hex()
            if global_step in save_at:
                saved.append(save_checkpoint(ckpt_dir, booster, model, optimizer, scheduler, epoch, step, BATCH))
            if global_step == total_steps:
                break
        epoch += 1
    return losses, model, saved


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resume", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from safetensors.torch import save_file

    losses, model, _ = train(args.steps, resume_from=args.resume)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "losses.json").write_text(json.dumps(losses))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "final.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
