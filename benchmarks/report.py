"""The benchmark's table (Markdown, pasted into the README), its targets, and its chart."""

from __future__ import annotations

from pathlib import Path

MiB = 1024 * 1024
OPS = ("save", "async save, call returns", "async save, durable", "load cold", "load warm")


def _ours(op: str) -> str:
    return "save/ckptio" if op.startswith("async") else f"{op}/ckptio"


def rows(result: dict) -> list[dict]:
    med, peak, size = result["medians"], result["peak_rss_bytes"], result["size_bytes"]
    out = []
    for op in OPS:
        order = list(result["tools"])
        keys = [k for k in med if k.startswith(op + "/")]
        for key in sorted(keys, key=lambda k: order.index(k.split("/", 1)[1]) if k.split("/", 1)[1] in order else 0):
            tool = key.split("/", 1)[1]
            ours = med.get(_ours(op))
            seconds = med[key]
            out.append(
                {
                    "op": op,
                    "tool": tool,
                    "seconds": seconds,
                    "gb_per_s": size / seconds / 1e9 if seconds else float("inf"),
                    "peak_mib": peak[key] / MiB,
                    "ratio": seconds / ours if ours else None,
                }
            )
    return out


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def table(result: dict) -> str:
    m = result["machine"]
    head = (
        f"{_size(result['size_bytes'])} {result.get('state', 'float32 GPT-2-shaped state dict')} "
        f"({result['tensors']} tensors), "
        f"median of {result['repeats']}, {m['date_utc']}, {m.get('cpu', '?')}, {m['cpus']} CPUs, "
        f"{m['memory_gib']} GiB, torch {m['torch']}"
    )
    lines = [
        head,
        "",
        "| operation | tool | median s | GB/s | peak RSS above live, MiB | time / ckptio's |",
        "|---|---|---:|---:|---:|---:|",
    ]
    labels = {name: info["label"] for name, info in result["tools"].items()}
    labels["ckptio"] = "ckptio"
    for r in rows(result):
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else ""
        lines.append(
            f"| {r['op']} | {labels.get(r['tool'], r['tool'])} | {r['seconds']:.3f} | {r['gb_per_s']:.2f} "
            f"| {r['peak_mib']:.0f} | {ratio} |"
        )
    first = result["medians"].get("async first call (allocates staging)/ckptio")
    if first is not None:
        lines.append("")
        lines.append(f"First async call of a process (allocates the staging buffers once): {first:.3f} s.")
    for note in result["notes"]:
        lines.append(f"Note: {note}.")
    lines.append("")
    lines.append("Targets:")
    for name, t in result.get("targets", {}).items():
        lines.append(f"- {'met' if t['met'] else 'NOT met'}: {name} ({t['detail']})")
    return "\n".join(lines)


def targets(result: dict) -> dict:
    med, peak = result["medians"], result["peak_rss_bytes"]
    shard = result["largest_shard_bytes"]
    out: dict[str, dict] = {}

    def check(name: str, met: bool, detail: str) -> None:
        out[name] = {"met": bool(met), "detail": detail}

    ours_save = med.get("save/ckptio")
    if ours_save and "save/raw" in med:
        speed = med["save/raw"] / ours_save
        check("sync save >= 90% of raw fsync'd write speed", speed >= 0.9, f"{speed:.0%} of raw")
    for peer in ("torch", "safetensors"):
        if ours_save and f"save/{peer}" in med:
            r = med[f"save/{peer}"] / ours_save
            check(f"sync save not slower than {peer}", r >= 1.0, f"{peer} takes {r:.2f}x ours")
    for kind in ("cold", "warm"):
        ours = min(med.get(f"load {kind}/ckptio", float("inf")), med.get(f"load {kind}/ckptio_t2", float("inf")))
        if ours < float("inf") and f"load {kind}/safetensors" in med:
            r = med[f"load {kind}/safetensors"] / ours
            check(f"load {kind} not slower than safetensors", r >= 1.0, f"safetensors takes {r:.2f}x ours")
    if "load cold/ckptio" in med and "load cold/raw" in med:
        ours = min(med["load cold/ckptio"], med.get("load cold/ckptio_t2", float("inf")))
        speed = med["load cold/raw"] / ours
        check("cold load >= 90% of raw sequential read", speed >= 0.9, f"{speed:.0%} of raw")
    if ours_save and "async save, call returns/ckptio" in med:
        r = med["async save, call returns/ckptio"] / ours_save
        check("async call returns in <= 10% of sync save", r <= 0.10, f"{r:.1%}")
    limit = shard + 64 * MiB
    if "save/ckptio" in peak:
        check(
            "sync save peak RSS <= largest shard + 64 MiB",
            peak["save/ckptio"] <= limit,
            f"{peak['save/ckptio'] / MiB:.0f} MiB vs {limit / MiB:.0f} MiB",
        )
    loads = [peak[k] for k in ("load cold/ckptio", "load warm/ckptio") if k in peak]
    if loads:
        check(
            "load peak RSS <= largest shard + 64 MiB",
            max(loads) <= limit,
            f"{max(loads) / MiB:.0f} MiB vs {limit / MiB:.0f} MiB",
        )
    return out


def chart(result: dict, path: Path) -> str | None:
    """A PNG with one panel per operation; returns a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "[bench] matplotlib is not installed (pip install -e '.[dev]'): no chart"
    data = rows(result)
    panels: dict[str, list[tuple[str, float]]] = {}
    for r in data:
        if r["op"].startswith("async save"):
            panels.setdefault("save", []).append(("ckptio async: " + r["op"].split(", ")[1], r["seconds"]))
        else:
            panels.setdefault(r["op"], []).append((r["tool"], r["seconds"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (op, part) in zip(axes[0], panels.items()):
        names = [n for n, _ in part]
        colors = [
            "tab:orange" if n.startswith("ckptio") else "tab:gray" if n.startswith("raw") else "tab:blue" for n in names
        ]
        ax.barh(names, [sec for _, sec in part], color=colors)
        ax.invert_yaxis()
        ax.set_title(op)
        ax.set_xlabel("seconds (median, lower is better)")
    fig.suptitle(f"{result['size_bytes'] / 1e9:.2f} GB state dict, {result['machine']['date_utc']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"[bench] wrote {path}"
