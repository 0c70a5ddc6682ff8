"""Real Lightning Trainer runs with LightningCheckpointIO, in one process (Lightning's import costs
several seconds: it is paid once). Run by tests/integrations/test_lightning.py::

    python tests/integrations/lightning_job.py OUT

1. ``straight``: 4 epochs of 2 steps, checkpointing every epoch (``last.ckpt`` and the best one).
2. ``killed``: the same run in a forked child that SIGKILLs itself inside the save of ``last.ckpt``
   at the end of the second epoch, after its files are written and before the commit.
3. ``resumed``: ``fit(ckpt_path="last")`` in the killed run's folder, with ``use_async=True``.
4. ``pytorch_lightning``: one epoch with ``pytorch_lightning.Trainer`` and its plugin class, then a
   second one resumed from ``last``.

It writes ``OUT/<run>.pt`` (the final weights, ``torch.save``), ``OUT/killed.json`` (how the child
ended and what ``last.ckpt`` held after it) and ``OUT/times.json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

start = time.perf_counter()
import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ckptio.integrations.lightning import LightningCheckpointIO  # noqa: E402
from ckptio.integrations.lightning_format import load_lightning_checkpoint  # noqa: E402
from ckptio.storage import atomic  # noqa: E402

IMPORTED = time.perf_counter() - start
EPOCHS = 4


def module_class(base):
    class Tiny(base):
        """Adam + StepLR on a small MLP; no randomness after construction (no dropout, no shuffle)."""

        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.8)]

    return Tiny


def data():
    gen = torch.Generator().manual_seed(1)
    dataset = torch.utils.data.TensorDataset(torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen))
    return torch.utils.data.DataLoader(dataset, batch_size=4)


def fit(lib, folder: Path, plugin, epochs: int = EPOCHS, ckpt_path=None) -> nn.Module:
    checkpoints = lib.pytorch.callbacks.ModelCheckpoint if lib is L else lib.callbacks.ModelCheckpoint
    trainer = lib.Trainer(
        max_epochs=epochs, default_root_dir=str(folder), logger=False, enable_progress_bar=False,
        enable_model_summary=False, plugins=[plugin], accelerator="cpu",
        callbacks=[checkpoints(dirpath=str(folder / "checkpoints"), save_last=True)],
    )  # fmt: skip
    model = module_class(lib.LightningModule)()
    trainer.fit(model, data(), ckpt_path=ckpt_path)
    return model


def weights(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def killed_run(folder: Path) -> dict:
    """Fork a child that trains and SIGKILLs itself at the 4th commit (last.ckpt after the second epoch)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        commits = 0
        swap = atomic.FolderCommit._swap

        def dying_swap(self):
            nonlocal commits
            commits += 1
            if commits == 4:  # epoch 1's best, epoch 1's last, epoch 2's best, then epoch 2's last
                os.kill(os.getpid(), signal.SIGKILL)
            swap(self)

        atomic.FolderCommit._swap = dying_swap
        try:
            fit(L, folder, LightningCheckpointIO())
        finally:
            os._exit(3)  # reached only if the kill did not happen
    _, status = os.waitpid(pid, 0)
    last = folder / "checkpoints" / "last.ckpt"
    held = load_lightning_checkpoint(last)
    return {
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "last_epoch": held["epoch"],
        "last_global_step": held["global_step"],
        "leftovers": sorted(p.name for p in last.parent.iterdir() if p.name.startswith(".")),
    }


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    times = {"import lightning": IMPORTED}
    t = time.perf_counter()
    torch.save(weights(fit(L, out / "straight", LightningCheckpointIO())), out / "straight.pt")
    times["straight"] = time.perf_counter() - t
    t = time.perf_counter()
    (out / "killed.json").write_text(json.dumps(killed_run(out / "run")))
    times["killed"] = time.perf_counter() - t
    t = time.perf_counter()
    resumed = fit(L, out / "run", LightningCheckpointIO(use_async=True), ckpt_path="last")
    torch.save(weights(resumed), out / "resumed.pt")
    last = load_lightning_checkpoint(out / "run" / "checkpoints" / "last.ckpt")
    torch.save(last["optimizer_states"], out / "resumed_optimizer.pt")
    straight_last = load_lightning_checkpoint(out / "straight" / "checkpoints" / "last.ckpt")
    torch.save(straight_last["optimizer_states"], out / "straight_optimizer.pt")
    times["resumed"] = time.perf_counter() - t

    t = time.perf_counter()
    import pytorch_lightning as pl

    from ckptio.integrations.pytorch_lightning import LightningCheckpointIO as PLCheckpointIO

    times["import pytorch_lightning"] = time.perf_counter() - t
    t = time.perf_counter()
    fit(pl, out / "pl", PLCheckpointIO(), epochs=1)
    torch.save(weights(fit(pl, out / "pl", PLCheckpointIO(), epochs=2, ckpt_path="last")), out / "pl_resumed.pt")
    torch.save(weights(fit(pl, out / "pl_straight", PLCheckpointIO(), epochs=2)), out / "pl_straight.pt")
    times["pytorch_lightning"] = time.perf_counter() - t
    (out / "times.json").write_text(json.dumps(times))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
