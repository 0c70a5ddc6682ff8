"""Peak memory of turning a ``torch.distributed.checkpoint`` folder into one file or folder a user can load.

    .venv/bin/python benchmarks/convert_memory.py --size-gb 1 --nproc 2

A GPT-2 shaped float32 state dict (names as ``transformers`` has them, ``lm_head`` tied away) is
saved with ``dcp.save`` from ``--nproc`` forked gloo ranks, each holding ``Shard(0)`` of every
tensor (what an FSDP2 run writes). Each tool then runs in a fresh process, one after the other,
in ``--repeats`` rounds:

* ``ckptio``: ``ckptio.tools.convert_checkpoint(dcp, hf_folder)`` (what ``ckptio convert`` runs),
  a Hugging Face safetensors folder of 1 GiB shards;
* ``dcp_to_torch_save``: ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(dcp, out.pt)``,
  DCP's own converter, one ``torch.save`` file;
* ``baseline``: the same imports, no work (what any Python process with torch holds).

Each process reports its RSS after the imports and its high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` after the imports) and the time of the call; the page cache is warm (the
folder was just written: nothing is dropped, the machine is shared). Figures are medians; the
peak above the process's own RSS before the call is the memory the conversion itself needed.
Writes ``convert_memory.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

MiB = 1024 * 1024
TOOLS = ("baseline", "ckptio", "dcp_to_torch_save")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(tool: str, src: str, dst: str) -> None:
    """One measurement, in this fresh process: prints one JSON line."""
    import torch  # noqa: F401
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from ckptio.tools import convert_checkpoint

    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    if tool == "ckptio":
        convert_checkpoint(src, dst)
    elif tool == "dcp_to_torch_save":
        dcp_to_torch_save(src, dst)
    seconds = time.perf_counter() - start
    print(json.dumps({"rss_before": before, "peak": _status_bytes("VmHWM"), "seconds": seconds}))


def _state(size_gb: float):
    import torch
    from run import gpt_config
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        skeleton = GPT2LMHeadModel(gpt_config(int(size_gb * 1024**3))).state_dict()
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=gen) for k, v in skeleton.items() if k != "lm_head.weight"}


def _save_rank(rank: int, nproc: int, folder: str, size_gb: float, store: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=nproc)
    try:
        mesh = init_device_mesh("cpu", (nproc,))
        state = {k: distribute_tensor(v, mesh, [Shard(0)], src_data_rank=None) for k, v in _state(size_gb).items()}
        dcp.save(state, checkpoint_id=folder)
    finally:
        dist.destroy_process_group()


def write_dcp(folder: Path, size_gb: float, nproc: int) -> dict:
    import torch.multiprocessing as mp

    store = folder.parent / "rendezvous"
    mp.start_processes(_save_rank, args=(nproc, str(folder), size_gb, str(store)), nprocs=nproc, start_method="fork")
    total = sum(p.stat().st_size for p in folder.iterdir())
    return {"dcp_bytes": total, "files": sorted(p.name for p in folder.iterdir())}


def _largest_tensor(folder: Path) -> int:
    from ckptio.formats.dcp import read_metadata

    meta = read_metadata(folder / ".metadata")
    return max(math.prod(t.shape) * t.dtype.itemsize for t in meta.tensors.values())


def run_tool(tool: str, src: Path, dst: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1] / "src"),
                                                      env.get("PYTHONPATH")]))  # fmt: skip
    cmd = [sys.executable, __file__, "--child", tool, str(src), str(dst)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if dst.is_dir():
        shutil.rmtree(dst)
    elif dst.exists():
        dst.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--out", default=".", help="folder for convert_memory.json")
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    root = Path(tempfile.mkdtemp(prefix="ckptio-convert-memory-", dir=args.dir))
    try:
        src = root / "dcp"
        info = write_dcp(src, args.size_gb, args.nproc)
        info["largest_tensor"] = _largest_tensor(src)
        runs: dict[str, list[dict]] = {tool: [] for tool in TOOLS}
        for _ in range(args.repeats):
            for tool in TOOLS:
                dst = root / ("out.pt" if tool == "dcp_to_torch_save" else "hf")
                runs[tool].append(run_tool(tool, src, dst))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {
        tool: {key: statistics.median(r[key] for r in rs) for key in ("rss_before", "peak", "seconds")}
        for tool, rs in runs.items()
    }
    result = {"size_gb": args.size_gb, "nproc": args.nproc, "repeats": args.repeats, **info, "runs": runs,
              "medians": medians}  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "convert_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"DCP folder: {info['dcp_bytes'] / MiB:.0f} MiB from {args.nproc} ranks, "
          f"largest tensor {info['largest_tensor'] / MiB:.0f} MiB")  # fmt: skip
    print("| tool | peak RSS MiB | RSS before the call MiB | peak above it MiB | seconds (warm) |")
    print("|---|---|---|---|---|")
    for tool in TOOLS:
        m = medians[tool]
        print(f"| {tool} | {m['peak'] / MiB:.0f} | {m['rss_before'] / MiB:.0f} | "
              f"{(m['peak'] - m['rss_before']) / MiB:.0f} | {m['seconds']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
