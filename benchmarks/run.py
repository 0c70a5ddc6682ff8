"""Save and load the same GPT-like state dict with ckptio and the tools users would pick instead.

    bash scripts/bench.sh                       # about 1 GiB of float32, 3 repeats
    .venv/bin/python benchmarks/run.py --size-gb 0.2 --repeats 5
    .venv/bin/python benchmarks/run.py --many-small 5000 --tools raw ckptio safetensors --no-cold
                                                # 5,000 tensors of 16 floats: per-tensor costs

Everything runs in ONE process, on one state dict, so ratios compare like with like; the
tools take turns inside each repeat (the order rotates) so a slow moment of the disk hits
all of them, and every figure is a median. Loads are timed cold (page cache dropped with
``sync; echo 3 > /proc/sys/vm/drop_caches``, root only: the report says when that was not
allowed) and warm (again, right after). Peak RSS is the process's high-water mark above
what it held before the call (reset through ``/proc/self/clear_refs``). Writes
``bench.json`` and ``bench.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import report  # noqa: E402

MiB = 1024 * 1024


# ----------------------------------------------------------------------------- the process


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure(fn) -> tuple[float, int]:
    """Seconds for ``fn()`` and the RSS high-water mark above the RSS before it."""
    gc.collect()
    before = _status_bytes("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, max(0, _status_bytes("VmHWM") - before)


def drop_caches() -> str | None:
    """Empty the page cache; returns why not when the OS refuses."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return None
    except OSError as exc:
        return f"dropping the page cache is not permitted here ({exc.strerror}); 'cold' loads are warm"


# ----------------------------------------------------------------------------- the model


def gpt_config(size_bytes: int):
    """A GPT-2 shaped config whose float32 weights take about ``size_bytes``."""
    from transformers import GPT2Config

    if size_bytes >= 512 * MiB:
        n_embd, vocab, positions = 1024, 50257, 1024
    elif size_bytes >= 48 * MiB:
        n_embd, vocab, positions = 512, 16384, 512
    else:
        n_embd, vocab, positions = 128, 1024, 128
    params = size_bytes // 4
    per_layer = 12 * n_embd * n_embd + 13 * n_embd
    n_layer = max(1, round((params - (vocab + positions) * n_embd) / per_layer))
    return GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=max(1, n_embd // 64),
        vocab_size=vocab,
        n_positions=positions,
        bos_token_id=0,
        eos_token_id=0,
    )


def small_tensors_context(count: int, root: Path, shard_mib: int) -> cases.Context:
    """``count`` tensors of 16 float32 each: what per-tensor costs (headers, one read or one
    Python object per tensor) weigh when the bytes are few (embedding tables split per row,
    many LoRA adapters, optimizer scalars)."""
    torch.manual_seed(0)
    model = torch.nn.ParameterDict({f"t{i}": torch.nn.Parameter(torch.randn(16), requires_grad=False)
                                    for i in range(count)})  # fmt: skip
    state = {k: t.detach() for k, t in model.state_dict().items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    return cases.Context(model, state, root, shard_mib, torch.ones(nbytes, dtype=torch.uint8))


def build_context(size_gb: float, root: Path, shard_mib: int) -> cases.Context:
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from ckptio.state.model import state_to_save

    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt_config(int(size_gb * 1024**3))).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # tied lm_head once, as every tool below stores it
    state = {k: t.contiguous() for k, t in state_to_save(model).items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    read_buffer = torch.ones(nbytes, dtype=torch.uint8)  # touched: existing memory
    return cases.Context(model, state, root, shard_mib, read_buffer)


def machine() -> dict:
    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    return info


# ----------------------------------------------------------------------------- the run


def _rotate(items: list, k: int) -> list:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def run(args: argparse.Namespace) -> dict:
    from ckptio import Booster

    tools = [t for t in cases.TOOLS if not args.tools or t.name in args.tools or t.name in ("raw", "ckptio")]
    root = Path(tempfile.mkdtemp(prefix="ckptio-bench-", dir=args.dir))
    if args.many_small:
        tools = [t for t in tools if t.name not in cases.NEEDS_PRETRAINED]
        ctx = small_tensors_context(args.many_small, root, args.shard_mib)
        described = f"{args.many_small} float32 tensors of 16 elements"
    else:
        ctx = build_context(args.size_gb, root, args.shard_mib)
        described = "float32 GPT-2-shaped state dict"
    nbytes = ctx.read_buffer.numel()
    samples: dict[str, dict[str, list]] = {}
    notes: list[str] = []

    def add(op: str, tool: str, seconds: float, peak: int) -> None:
        entry = samples.setdefault(f"{op}/{tool}", {"seconds": [], "peak_rss_bytes": []})
        entry["seconds"].append(seconds)
        entry["peak_rss_bytes"].append(peak)

    saving = [t for t in tools if t.name not in cases.SAVED_BY]
    booster = Booster()  # async saves: one booster, its staging buffers reused across repeats
    first = measure(
        lambda: booster.save_model(
            ctx.model, root / "async", shard=True, use_safetensors=True, size_per_shard=args.shard_mib, use_async=True
        )
    )
    booster.wait()
    add("async first call (allocates staging)", "ckptio", *first)
    cold_problem = None
    try:
        for rep in range(args.repeats):
            print(f"[bench] repeat {rep + 1}/{args.repeats}: saving", flush=True)
            for tool in _rotate(saving, rep):
                path = ctx.path(tool.name)
                cases.remove(path)
                os.sync()
                time.sleep(args.settle)
                add("save", tool.name, *measure(lambda tool=tool, path=path: tool.save(ctx, path)))
            cases.remove(root / "async")
            os.sync()
            time.sleep(args.settle)
            returned = measure(
                lambda: booster.save_model(
                    ctx.model,
                    root / "async",
                    shard=True,
                    use_safetensors=True,
                    size_per_shard=args.shard_mib,
                    use_async=True,
                )
            )
            durable = measure(booster.wait)
            add("async save, call returns", "ckptio", *returned)
            add("async save, durable", "ckptio", returned[0] + durable[0], max(returned[1], durable[1]))
            print(f"[bench] repeat {rep + 1}/{args.repeats}: loading", flush=True)
            for tool in _rotate([t for t in tools if t.load is not None], rep):
                path = ctx.path(cases.SAVED_BY.get(tool.name, tool.name))
                if not args.no_cold:
                    cold_problem = drop_caches()
                    add("load cold", tool.name, *measure(lambda tool=tool, path=path: tool.load(ctx, path)))
                add("load warm", tool.name, *measure(lambda tool=tool, path=path: tool.load(ctx, path)))
    finally:
        cases.remove(root)
    if args.no_cold:
        notes.append("cold-cache loads skipped (--no-cold)")
    elif cold_problem:
        notes.append(cold_problem)
    shard_sizes = _largest_shard(ctx)
    return {
        "machine": machine(),
        "state": described,
        "size_bytes": nbytes,
        "tensors": len(ctx.state),
        "repeats": args.repeats,
        "shard_mib": args.shard_mib,
        "largest_shard_bytes": shard_sizes,
        "tools": {t.name: {"label": t.label, "load": t.load_note} for t in tools},
        "notes": notes,
        "samples": samples,
        "medians": {key: statistics.median(v["seconds"]) for key, v in samples.items()},
        "peak_rss_bytes": {key: max(v["peak_rss_bytes"]) for key, v in samples.items()},
    }


def _largest_shard(ctx: cases.Context) -> int:
    from ckptio.engine.plan import plan_files

    sizes = [(k, t.numel() * t.element_size()) for k, t in ctx.state.items()]
    plan = plan_files(sizes, 1, weights_name="model.safetensors", max_shard_bytes=ctx.shard_mib * MiB)
    return max(sum(dict(sizes)[k] for k in keys) for _, keys in plan.files)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0, help="GiB of float32 weights (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--shard-mib", type=int, default=256, help="shard size for the sharded tools (MiB)")
    parser.add_argument("--dir", default=None, help="where to write checkpoints (default: the system temp dir)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="JSON + PNG here")
    parser.add_argument("--tools", nargs="*", default=None, help="subset of: " + " ".join(t.name for t in cases.TOOLS))
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of rest after a sync, before each save")
    parser.add_argument("--no-cold", action="store_true", help="skip cold-cache loads")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--many-small",
        type=int,
        default=0,
        metavar="N",
        help="instead of the GPT-2 state: N tensors of 16 floats (per-tensor costs); skips transformers",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    result["targets"] = report.targets(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(report.table(result))
    if not args.no_chart:
        chart = report.chart(result, out / "bench.png")
        if chart:
            print(chart)
    print(f"[bench] wrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
