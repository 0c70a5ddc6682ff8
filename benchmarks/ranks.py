"""Multi-rank saves and loads side by side: ckptio against torch.distributed.checkpoint (DCP).

    .venv/bin/python benchmarks/ranks.py --size-gb 0.5 --nproc 2 --repeats 3

One GPT-2-shaped float32 model, FSDP2 (``fully_shard`` per block and the root, a ``'cpu'``
mesh, gloo on 127.0.0.1) or DDP, on ``--nproc`` forked ranks. In every repeat the tools take
turns (the order rotates); each figure is the median of the time from a barrier before the call
to a barrier after it (every save ends durable: ckptio fsyncs, DCP's ``FileSystemWriter`` too).
Rows, with the time as a ratio to ckptio's default save or load of the same layout:

* ``ckptio``: ``save_model(shard=True, use_safetensors=True)``, a Hugging Face folder (several
  ranks fill the files in place);
* ``ckptio, gathered``: the same files, each collected on its owner rank first (ablation:
  ``ckptio.engine.write.IN_PLACE = False``);
* ``ckptio, one process``: the same model saved by a plain ``Booster()`` in one process (the
  files a multi-rank save must reproduce byte for byte);
* ``dcp``: ``dcp.save`` / ``dcp.load`` of ``model.state_dict()`` (DCP's own format, which
  ``transformers`` cannot load);
* ``dcp, HF writer + consolidation``: DCP's ``HuggingFaceStorageWriter`` with
  ``save_distributed=True, enable_consolidation=True``: each rank writes its shards, then they
  are consolidated into full-tensor safetensors files (what a Hugging Face folder needs);
* loads into the live sharded model: ckptio reads only each rank's boxes, DCP too.

Writes ``ranks.json`` into ``--out``.
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
import traceback
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import MiB, gpt_config  # noqa: E402


def _model(size_gb: float):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt_config(int(size_gb * 1024**3))).eval()


def _boost(model, layout: str):
    from ckptio import Booster
    from ckptio.plugins import TorchDDPPlugin, TorchFSDPPlugin

    booster = Booster(plugin=TorchFSDPPlugin() if layout == "fsdp" else TorchDDPPlugin())
    model, *_ = booster.boost(model)
    return booster, model


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _worker(rank: int, nproc: int, args, workdir: Path, results) -> None:
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"file://{workdir}/rdzv", rank=rank, world_size=nproc, timeout=timedelta(seconds=600)
        )
        import torch.distributed.checkpoint as dcp

        from ckptio.engine import write as engine_write

        booster, model = _boost(_model(args.size_gb), args.layout)
        live = model.module if args.layout == "ddp" else model
        shard_mib = args.shard_mib
        root = workdir / "ck"

        def clear(path: Path) -> None:
            dist.barrier()
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
            dist.barrier()

        def ckptio_save(in_place: bool):
            def run():
                engine_write.IN_PLACE = in_place
                try:
                    booster.save_model(
                        model, root / "ckptio", shard=True, use_safetensors=True, size_per_shard=shard_mib
                    )
                finally:
                    engine_write.IN_PLACE = True

            return run

        def dcp_save():
            dcp.save(live.state_dict(), checkpoint_id=str(root / "dcp"))

        def dcp_hf_save():
            # DCP's Hugging Face writer: each rank writes its shards, then they are consolidated into
            # full-tensor safetensors files (about 1 GB each, as ckptio's shards) that transformers loads
            sd = dict(live.state_dict())
            sd.pop("lm_head.weight", None)  # tied to wte (it refuses shared tensors; save_pretrained drops it too)
            sizes, index, used = {}, {}, 0
            for fqn, t in sd.items():
                used += t.numel() * t.element_size()
                index[fqn] = 1 + used // (shard_mib * MiB)
                sizes[fqn] = t.numel()
            writer = dcp.HuggingFaceStorageWriter(
                str(root / "dcp_hf"), fqn_to_index_mapping=index, save_distributed=True, enable_consolidation=True
            )
            dcp.save(sd, storage_writer=writer)
            if rank == 0:
                _fsync_tree(root / "dcp_hf")

        saves = {
            "ckptio": ckptio_save(True),
            "ckptio, gathered": ckptio_save(False),
            "dcp": dcp_save,
            "dcp, HF writer + consolidation": dcp_hf_save,
        }
        loads = {
            "ckptio": lambda: booster.load_model(model, root / "ckptio"),
            "dcp": lambda: dcp.load(live.state_dict(), checkpoint_id=str(root / "dcp")),
        }
        samples: dict[str, list[float]] = {}
        names = list(saves)
        for repeat in range(args.repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                clear(root / {"dcp": "dcp", "dcp, HF writer + consolidation": "dcp_hf"}.get(name, "ckptio"))
                samples.setdefault(f"save | {name}", []).append(_timed(saves[name]))
            for name in ("ckptio", "dcp"):  # the files of the last saves, warm in the page cache
                if name == "ckptio":
                    clear(root / "ckptio")
                    saves["ckptio"]()
                samples.setdefault(f"load | {name}", []).append(_timed(loads[name]))
        results.put((rank, True, samples))
    except BaseException:  # noqa: BLE001
        results.put((rank, False, traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)


def _one_process(args, workdir: Path) -> list[float]:
    """The same model saved by one plain process: what the ranks' files must equal."""
    from ckptio import Booster

    model = _model(args.size_gb)
    out = []
    for _ in range(args.repeats):
        target = workdir / "one"
        shutil.rmtree(target, ignore_errors=True)
        start = time.perf_counter()
        Booster().save_model(model, target, shard=True, use_safetensors=True, size_per_shard=args.shard_mib)
        out.append(time.perf_counter() - start)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=0.5)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layout", choices=("fsdp", "ddp"), default="fsdp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-mib", type=int, default=128, help="size_per_shard of ckptio's saves (MiB)")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ckptio-ranks-", dir=args.dir))
    try:
        ctx = mp.get_context("fork")
        results = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, args.nproc, args, workdir, results)) for r in range(args.nproc)]
        for p in procs:
            p.start()
        reports = dict((rank, (ok, value)) for rank, ok, value in (results.get(timeout=3600) for _ in procs))
        for p in procs:
            p.join(60)
        failed = [v for ok, v in reports.values() if not ok]
        if failed:
            print("\n".join(failed), file=sys.stderr)
            return 1
        samples = reports[0][1]
        samples["save | ckptio, one process"] = _one_process(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    nbytes = sum(t.numel() * t.element_size() for t in _model(args.size_gb).state_dict().values())
    print(f"{args.layout} on {args.nproc} ranks, {nbytes / 1e9:.2f} GB float32, median of {args.repeats}")
    print(f"{'operation':<8} {'tool':<32} {'median s':>9} {'GB/s':>6} {'/ ckptio':>9}")
    for key in sorted(medians, key=lambda k: (k.split(" | ")[0] != "save", k)):
        op, tool = key.split(" | ")
        ref = medians[f"{op} | ckptio"]
        print(f"{op:<8} {tool:<32} {medians[key]:>9.3f} {nbytes / 1e9 / medians[key]:>6.2f} {medians[key] / ref:>9.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranks.json").write_text(json.dumps({"args": vars(args), "bytes": nbytes, "samples": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
