"""Smaller checkpoints: bytes written and seconds per checkpoint, and bytes on disk, against a
full save each time.

    .venv/bin/python benchmarks/smaller.py                 # a ~235 MB Llama, 10 checkpoints a run
    .venv/bin/python benchmarks/smaller.py --hidden 64 --layers 2 --vocab 512 --checkpoints 3   # a smoke run

Two training runs on a small Llama (``transformers``, built from a config, no download), one
AdamW step between checkpoints, each run three times from the same seed:

* ``lora``: a LoRA fine-tune (peft, ``booster.enable_lora``; rank 16 on q/v): the base is frozen;
* ``half``: the embedding and the first half of the decoder layers frozen, the rest trained.

Each run saves ``--checkpoints`` training checkpoints (model, AdamW, RNG; ``save_checkpoint``)
three ways: ``full`` (``reuse_unchanged=False``: every byte written again, what other libraries
do), ``linked`` (the default: files whose bytes the previous checkpoint holds are hard-linked)
and ``trainable-only`` (``only_trainable=True``: the frozen tensors are left out, the base
comes from the base weights). Figures, all in this one process: bytes handed to ``write`` for
each save (``/proc/self/io`` ``wchar``), seconds per save (the call, every file fsync'd), and
the run's folder on disk at the end (each inode counted once). ``changed`` is what a step
changes: the trained parameters and the optimizer's state. Writes ``smaller.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

MB = 1e6


def wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def bytes_on_disk(folder: Path) -> int:
    """Allocated bytes under ``folder``, each inode once (hard links share their blocks)."""
    seen, total = set(), 0
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.stat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def build(args, run: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckptio import Booster

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
        vocab_size=args.vocab, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    booster = Booster()
    if run == "lora":
        from peft import LoraConfig

        config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
        model = booster.enable_lora(model, lora_config=config)
    else:
        for name, param in model.named_parameters():
            layer = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None
            param.requires_grad_(not ("embed_tokens" in name or (layer is not None and layer < args.layers // 2)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer, *_ = booster.boost(model, optimizer)
    return booster, model, optimizer


def step(model, optimizer, seed: int) -> None:
    batch = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(seed))
    loss = model(batch, labels=batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def one_run(args, run: str, mode: str, folder: Path) -> dict:
    from ckptio.training import save_checkpoint

    booster, model, optimizer = build(args, run)
    trained = [p for p in model.parameters() if p.requires_grad]
    weights = tensor_bytes(model.state_dict().values())
    written, seconds = [], []
    for n in range(args.checkpoints):
        step(model, optimizer, n)
        before, start = wchar(), time.perf_counter()
        save_checkpoint(
            folder, booster, model, optimizer, None, 0, n + 1, 1, size_per_shard=args.shard_mib,
            only_trainable=mode == "trainable-only", reuse_unchanged=mode != "full",
        )  # fmt: skip
        seconds.append(time.perf_counter() - start)
        written.append(wchar() - before)
    optimizer_bytes = tensor_bytes(t for s in optimizer.state.values() for t in s.values() if t.dim())
    return {
        "run": run,
        "mode": mode,
        "weights_bytes": weights,
        "changed_bytes": tensor_bytes(trained) + optimizer_bytes,
        "written": written,
        "seconds": seconds,
        "on_disk": bytes_on_disk(folder),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| run | mode | written / checkpoint (MB) | changed (MB) | s / checkpoint | first (s) | on disk, all (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        later = r["written"][1:] or r["written"]
        lines.append(
            f"| {r['run']} | {r['mode']} | {statistics.median(later) / MB:.2f} | {r['changed_bytes'] / MB:.2f} | "
            f"{statistics.median(r['seconds'][1:] or r['seconds']):.3f} | {r['seconds'][0]:.3f} | "
            f"{r['on_disk'] / MB:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--shard-mib", type=float, default=64.0)
    parser.add_argument("--runs", default="lora,half")
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    base = Path(tempfile.mkdtemp(prefix="ckptio-smaller-", dir=args.dir))
    results = []
    try:
        for run in args.runs.split(","):
            for mode in ("full", "linked", "trainable-only"):
                folder = base / f"{run}-{mode}"
                results.append(one_run(args, run, mode, folder))
                shutil.rmtree(folder)
                print(f"{run} {mode}: done", file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smaller.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"model: {results[0]['weights_bytes'] / MB:.1f} MB of weights; {args.checkpoints} checkpoints a run")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
