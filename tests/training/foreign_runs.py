"""Training folders written by the real tools, for the tests that load them with ckptio.

``trainer_run`` trains a tiny module with ``transformers.Trainer`` (8 optimizer steps over 2
epochs of 4, a checkpoint every 3 steps and at the end): ``checkpoint-3``, ``checkpoint-6``
(epoch 1.5) and ``checkpoint-8``. Every sample is the same one, so the Trainer's shuffling does
not change the batches and a loop of ours can continue its run step for step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

SAMPLES, BATCH, EPOCHS, SAVE_STEPS = 8, 2, 2, 3
STEPS = SAMPLES // BATCH * EPOCHS
_gen = torch.Generator().manual_seed(1)
X, Y = torch.randn(4, generator=_gen), torch.randn(2, generator=_gen)


class Tiny(nn.Module):
    """A module Trainer trains: keyword inputs, a dict with ``loss`` out, a LayerNorm (no weight decay)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x, labels=None):
        out = self.fc2(self.norm(torch.relu(self.fc1(x))))
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def tiny() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def trainer_run(output_dir: Path) -> Path:
    """Train with the real Trainer; returns ``output_dir`` with its ``checkpoint-N`` folders."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
        save_steps=SAVE_STEPS, max_grad_norm=0, seed=0, use_cpu=True, report_to=[], disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=tiny(), args=args, train_dataset=[{"x": X, "labels": Y}] * SAMPLES).train()
    return output_dir


def trainer_objects(model: nn.Module):
    """The optimizer and scheduler Trainer builds by default, built by hand as a user would:
    AdamW over two groups (weights with decay, then biases and norms) and the linear decay."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and not n.startswith("norm")]
    rest = [p for n, p in model.named_parameters() if not any(p is d for d in decay)]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": rest}], lr=5e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, (STEPS - s) / STEPS))
    return optimizer, scheduler


def train_step(model: nn.Module, optimizer, scheduler) -> None:
    """One step as Trainer takes it (no gradient clipping: max_grad_norm=0)."""
    loss = model(torch.stack([X] * BATCH), torch.stack([Y] * BATCH))["loss"]
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
