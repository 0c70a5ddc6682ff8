"""2-D parallel training (tensor parallel x FSDP2) with checkpoints that change layout.

1. ``--nproc 4 --tp 2``: a tiny Llama (built from a config, nothing downloaded) trains a few
   steps on a ``(dp=2, tp=2)`` mesh and saves model and optimizer as Hugging Face folders;
2. ``--nproc 2 --tp 2``: a new job on a ``(dp=1, tp=2)`` mesh loads them and keeps training;
3. this process loads the first checkpoint with ``transformers.from_pretrained`` and checks
   its weights against a single-process ``Booster().load_model``.

Run ``python examples/hybrid_2d.py`` (it launches the ranks itself, gloo on 127.0.0.1), or
one stage by hand with ``torchrun --nproc_per_node 4 examples/hybrid_2d.py --stage train
--out DIR``. On GPUs the same code runs with NCCL.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from ckptio import Booster
from ckptio.plugins import HybridParallelPlugin


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def stage(kind: str, out: Path, tp: int, steps: int) -> None:
    """One job: every rank runs this (as under torchrun)."""
    plugin = HybridParallelPlugin(tp_size=tp)  # dp = world_size // tp
    booster = Booster(plugin=plugin)
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # built on the plain model
    model, optimizer, *_ = booster.boost(model, optimizer)
    if kind == "resume":
        booster.load_model(model, out / "model")  # saved at another (dp, tp)
        booster.load_optimizer(optimizer, out / "optim")
    dp_rank, dp = plugin.mesh.get_local_rank("dp"), plugin.dp_size
    first = 0 if kind == "train" else steps
    for step in range(first, first + steps):
        batch = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(step))
        ids = batch[dp_rank * 4 // dp : (dp_rank + 1) * 4 // dp]  # tp ranks of one dp group share a batch
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if dist.get_rank() == 0:
            print(f"[{kind} mesh dp={dp} tp={tp}] step {step} loss {loss.item():.4f}", flush=True)
    if kind == "train":
        booster.save_model(model, out / "model", shard=True, use_safetensors=True)
        booster.save_optimizer(optimizer, out / "optim", shard=True)
    dist.destroy_process_group()


def launch(nproc: int, tp: int, kind: str, out: Path, steps: int) -> None:
    """Start ``nproc`` ranks of this script the way torchrun would (env:// rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    args = [sys.executable, __file__, "--stage", kind, "--out", str(out), "--tp", str(tp), "--steps", str(steps)]
    procs = [subprocess.Popen(args, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(nproc)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{kind} stage failed: exit codes {codes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["train", "resume"], help="run one stage (every rank)")
    parser.add_argument("--out", type=Path, help="checkpoint folder (default: a temporary one)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.stage:
        torch.set_num_threads(1)
        stage(args.stage, args.out, args.tp, args.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        launch(4, 2, "train", out, args.steps)  # (dp=2, tp=2)
        launch(2, 2, "resume", out, args.steps)  # (dp=1, tp=2): another layout
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(out / "model")
        plain = tiny_llama()
        Booster().load_model(plain, out / "model")
        same = all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), plain.state_dict().values()))
        print(f"transformers.from_pretrained == single-process load: {same}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
