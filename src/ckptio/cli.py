"""The ``ckptio`` command: look inside, check, convert and compare checkpoints without Python.

Every command takes a local path or an fsspec URL (``s3://bucket/run/ckpt``). Exit codes:
0 all good, 1 the check failed (``verify`` found a problem, ``diff`` found a difference),
2 bad input (missing path, unreadable checkpoint, wrong option).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from ckptio.checkpoint_io.model_files import (
    MiB,
    ModelCheckpoint,
    ModelSaveOptions,
    WeightsFile,
    is_safetensors_file,
    locate_model,
    model_owned_files,
    plan_model_files,
    write_model_metadata,
    write_weights_file,
)
from ckptio.checks import (
    is_training_checkpoint,
    locate_sharded_optimizer,
    optimizer_files,
    training_checkpoints_in,
    verify_path,
)
from ckptio.errors import CheckpointError
from ckptio.formats import naming, safetensors_format
from ckptio.formats.dtypes import element_size
from ckptio.progress import Progress
from ckptio.storage import atomic
from ckptio.storage.location import is_url, local_path
from ckptio.storage.manifest import read_manifest

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
SINGLE_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class BadInput(click.ClickException):
    """A problem with what the user passed: printed as ``error: ...``, exit code 2."""

    exit_code = EXIT_BAD_INPUT

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _checkpoint_arg(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Every command's path, normalised once as it is parsed: ``file:///x`` is the local ``/x``."""
    try:
        return local_path(value)
    except CheckpointError as exc:
        raise BadInput(str(exc)) from exc


@contextlib.contextmanager
def _local(path: str, *, quiet: bool) -> Iterator[str]:
    """The checkpoint itself, or a downloaded copy of a URL (removed afterwards)."""
    if not is_url(path):
        if not os.path.exists(path) and not os.path.lexists(path):
            raise BadInput(f"{path}: no such file or folder")
        yield path
        return
    from ckptio.storage.fsspec_storage import loading

    try:
        with loading(path, quiet=quiet) as local:
            yield local
    except CheckpointError as exc:
        raise BadInput(str(exc)) from exc


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@dataclass
class TensorEntry:
    key: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)


class ModelView:
    """A model checkpoint's files and tensor headers; tensors are read one at a time on request."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.ck: ModelCheckpoint = locate_model(path)
        self.tensors: dict[str, TensorEntry] = {}
        self.file_formats: dict[str, str] = {}
        self._open: dict[str, WeightsFile] = {}
        for name in self.ck.files:
            full = self.ck.folder / name
            weights = WeightsFile(full)
            try:
                shapes = weights.shapes()
            finally:
                weights.close()
            self.file_formats[name] = "safetensors" if is_safetensors_file(full) else "torch"
            for key, (dtype, shape) in shapes.items():
                self.tensors[key] = TensorEntry(key, name, dtype, tuple(shape))

    @property
    def format(self) -> str:
        kinds = sorted(set(self.file_formats.values()))
        return kinds[0] if len(kinds) == 1 else "mixed"

    def file_size(self, name: str) -> int:
        return (self.ck.folder / name).stat().st_size

    def read(self, key: str) -> torch.Tensor:
        entry = self.tensors[key]
        weights = self._open.get(entry.file)
        if weights is None:
            weights = self._open[entry.file] = WeightsFile(self.ck.folder / entry.file)
        return weights.read(key)

    def release(self, name: str) -> None:
        weights = self._open.pop(name, None)
        if weights is not None:
            weights.close()

    def close(self) -> None:
        for name in list(self._open):
            self.release(name)

    def keys_in_file_order(self) -> list[str]:
        order = {name: i for i, name in enumerate(self.ck.files)}
        return sorted(self.tensors, key=lambda k: order[self.tensors[k].file])


def _open_model(path: str) -> ModelView:
    try:
        return ModelView(path)
    except CheckpointError as exc:
        raise BadInput(str(exc)) from exc


# ----------------------------------------------------------------------------- inspect
def _inspect_summary(view: ModelView, with_tensors: bool) -> dict:
    manifest = read_manifest(view.ck.folder)
    files = []
    for name in view.ck.files:
        entries = [e for e in view.tensors.values() if e.file == name]
        files.append(
            {
                "name": name,
                "bytes": view.file_size(name),
                "tensors": len(entries),
                "parameters": sum(e.numel for e in entries),
                "dtypes": dict(Counter(_dtype_name(e.dtype) for e in entries)),
            }
        )
    summary = {
        "path": view.path,
        "kind": "model",
        "format": view.format,
        "sharded": view.ck.is_sharded,
        "index": Path(view.ck.index.path).name if view.ck.index is not None else None,
        "ckptio_manifest": manifest is not None,
        "tensor_count": len(view.tensors),
        "parameters": sum(e.numel for e in view.tensors.values()),
        "tensor_bytes": sum(e.nbytes for e in view.tensors.values()),
        "file_bytes": sum(f["bytes"] for f in files),
        "dtypes": dict(Counter(_dtype_name(e.dtype) for e in view.tensors.values())),
        "files": files,
    }
    if with_tensors:
        summary["tensors"] = [
            {"name": e.key, "dtype": _dtype_name(e.dtype), "shape": list(e.shape), "file": e.file}
            for e in view.tensors.values()
        ]
    return summary


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def _print_inspect(s: dict) -> None:
    layout = f"sharded ({s['index']}, {len(s['files'])} files)" if s["sharded"] else "single file"
    click.echo(f"checkpoint   {s['path']}")
    click.echo(f"format       {s['format']}, {layout}")
    click.echo(
        f"manifest     {'ckptio_manifest.json (sizes + xxh3-128 checksums)' if s['ckptio_manifest'] else 'none'}"
    )
    click.echo(f"tensors      {s['tensor_count']}")
    click.echo(f"parameters   {s['parameters']:,}")
    click.echo(f"bytes        {_human(s['tensor_bytes'])} of tensors, {_human(s['file_bytes'])} on disk")
    click.echo(f"dtypes       {', '.join(f'{k} ({v})' for k, v in sorted(s['dtypes'].items()))}")
    click.echo("")
    rows = [
        [f["name"], _human(f["bytes"]), str(f["tensors"]), f"{f['parameters']:,}", ", ".join(sorted(f["dtypes"]))]
        for f in s["files"]
    ]
    _print_table(rows, ["file", "size", "tensors", "parameters", "dtypes"])
    if "tensors" in s:
        click.echo("")
        rows = [[t["name"], t["dtype"], str(t["shape"]), t["file"]] for t in s["tensors"]]
        _print_table(rows, ["tensor", "dtype", "shape", "file"])


def _inspect_optimizer(path: str, located) -> dict:
    from ckptio.formats.hf_index import read_index

    folder = located.path.parent
    files = optimizer_files(located)
    return {
        "path": path,
        "kind": "optimizer",
        "layout": located.layout,
        "index": located.path.name,
        "ckptio_manifest": read_manifest(folder) is not None,
        "entries": len(read_index(located.path).weight_map),
        "file_bytes": sum((folder / f).stat().st_size for f in files if (folder / f).is_file()),
        "files": [{"name": f, "bytes": (folder / f).stat().st_size} for f in files if (folder / f).is_file()],
    }


class _Group(click.Group):
    """Turns a checkpoint error anywhere in a command into ``error: ...`` and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CheckpointError as exc:
            raise BadInput(str(exc)) from exc
        except BrokenPipeError:  # output piped into `head`: stop quietly, as Unix tools do
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (nothing more may reach the closed pipe)
            ctx.exit(0)
        except OSError as exc:
            if exc.filename is None:
                raise BadInput(str(exc.strerror or exc)) from exc
            raise BadInput(f"{exc.filename}: {exc.strerror or exc}") from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ckptio")
def main() -> None:
    """Look inside, check, convert and compare PyTorch checkpoints.

    PATH is a weights file (.safetensors, .bin), a checkpoint folder (Hugging Face or
    ColossalAI layout, sharded or not), an index JSON, or a URL such as s3://bucket/run/ckpt.

    \b
    Examples:
      ckptio inspect ./ckpt                  what is in it
      ckptio verify ./ckpt                   is every file intact (exit 0 = yes)
      ckptio convert ./ckpt model.safetensors  one file from a sharded folder
      ckptio diff ./ckpt model.safetensors   same tensors? (exit 0 = yes)
    """


@main.command()
@click.argument("path", callback=_checkpoint_arg)
@click.option("--tensors", is_flag=True, help="Also list every tensor with its dtype, shape and file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts) instead of text.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar while downloading a URL.")
def inspect(path: str, tensors: bool, as_json: bool, quiet: bool) -> None:
    """Show what a checkpoint holds: format, files, tensor count, parameters, bytes and dtypes.

    Only file headers are read, never the tensor data (a .bin file is memory-mapped).
    """
    with _local(path, quiet=quiet) as local:
        if is_training_checkpoint(local):
            _inspect_training(path, Path(local), tensors, as_json)
            return
        runs = training_checkpoints_in(local)
        if runs:
            _inspect_save_dir(path, runs, as_json)
            return
        located = locate_sharded_optimizer(local)
        if located is not None:
            opt = _inspect_optimizer(path, located)
            click.echo(json.dumps(opt, indent=1) if as_json else _optimizer_text(opt))
            return
        summary = _model_summary(path, local, tensors)
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        _print_inspect(summary)


def _model_summary(path: str, local: str | Path, tensors: bool) -> dict:
    view = _open_model(str(local))
    try:
        summary = _inspect_summary(view, tensors)
    finally:
        view.close()
    summary["path"] = path
    return summary


def _running_states(folder: Path) -> dict:
    from ckptio.training.checkpoint import RUNNING_STATES, load_json

    return load_json(folder / RUNNING_STATES)


def _inspect_training(path: str, folder: Path, tensors: bool, as_json: bool) -> None:
    """A training checkpoint: where the run was, then its model and optimizer parts."""
    from ckptio.training.checkpoint import MODEL_DIR, OPTIMIZER_DIR

    running = _running_states(folder)
    model = _model_summary(f"{path}/{MODEL_DIR}", folder / MODEL_DIR, tensors)
    located = locate_sharded_optimizer(folder / OPTIMIZER_DIR) if (folder / OPTIMIZER_DIR).is_dir() else None
    optimizer = _inspect_optimizer(f"{path}/{OPTIMIZER_DIR}", located) if located is not None else None
    covered = read_manifest(folder) is not None  # one manifest for the whole checkpoint, subfolders included
    for part in (model, optimizer):
        if part is not None:
            part["ckptio_manifest"] = covered
    if as_json:
        report = {"path": path, "kind": "training", "running_states": running, "model": model, "optimizer": optimizer}
        click.echo(json.dumps(report, indent=1))
        return
    click.echo(f"checkpoint   {path}")
    click.echo(
        f"training     epoch {running.get('epoch')}, step {running.get('step')}, "
        f"sample_start_index {running.get('sample_start_index')}, saved on {running.get('world_size', 1)} rank(s)"
    )
    click.echo("")
    _print_inspect(model)
    if optimizer is not None:
        click.echo("")
        click.echo(_optimizer_text(optimizer))


def _inspect_save_dir(path: str, runs: list[Path], as_json: bool) -> None:
    """A run's folder of training checkpoints (what CheckpointManager keeps), oldest first."""
    rows = []
    for folder in runs:
        files = [p for p in folder.rglob("*") if p.is_file()]
        try:
            running = _running_states(folder)
            where = f"epoch {running.get('epoch')}, step {running.get('step')}"
        except CheckpointError:
            where = "incomplete (no readable running_states.json)"
        rows.append(
            {"name": folder.name, "state": where, "files": len(files), "bytes": sum(p.stat().st_size for p in files)}
        )
    if as_json:
        click.echo(json.dumps({"path": path, "kind": "training runs", "checkpoints": rows}, indent=1))
        return
    click.echo(f"folder       {path}: {len(rows)} training checkpoint(s)")
    click.echo("")
    _print_table(
        [[r["name"], r["state"], str(r["files"]), _human(r["bytes"])] for r in rows],
        ["checkpoint", "state", "files", "size"],
    )


def _optimizer_text(s: dict) -> str:
    lines = [
        f"checkpoint   {s['path']}",
        f"kind         optimizer, {s['layout']} layout ({s['index']})",
        f"manifest     {'ckptio_manifest.json' if s['ckptio_manifest'] else 'none'}",
        f"entries      {s['entries']} in the index",
        f"bytes        {_human(s['file_bytes'])} in {len(s['files'])} files",
        "",
    ]
    rows = [[f["name"], _human(f["bytes"])] for f in s["files"]]
    widths = [max(len(r[i]) for r in [["file", "size"], *rows]) for i in (0, 1)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [["file", "size"], *rows]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- verify
@main.command()
@click.argument("path", callback=_checkpoint_arg)
@click.option("--no-checksums", is_flag=True, help="Check sizes only (fast); skip re-hashing every byte.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("-q", "--quiet", is_flag=True, help="Print only problems; no progress bar.")
def verify(path: str, no_checksums: bool, as_json: bool, quiet: bool) -> None:
    """Check a checkpoint: file sizes and checksums (against ckptio's manifest), every index
    entry present in its shard, and every file header readable.

    Exit code 0 only when everything is fine, 1 when a problem was found.
    """
    with _local(path, quiet=quiet) as local:
        ok, problems = verify_path(local, checksums=not no_checksums)
    if as_json:
        click.echo(json.dumps({"path": path, "ok": not problems, "checks": ok, "problems": problems}, indent=1))
    else:
        if not quiet:
            for line in ok:
                click.echo(f"ok    {line}")
        for line in problems:
            click.echo(f"FAIL  {line}")
        click.echo(f"{path}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    sys.exit(EXIT_OK if not problems else EXIT_FAILED)


# ----------------------------------------------------------------------------- convert
def _is_single_file(dst: str) -> bool:
    return dst.lower().endswith(SINGLE_FILE_SUFFIXES)


def _tensor_stream(view: ModelView, keys: list[str], bar: Progress) -> Iterator[memoryview | bytes]:
    """Tensor bytes one at a time, releasing each source file once its tensors are written."""
    remaining = Counter(view.tensors[k].file for k in keys)
    for key in keys:
        tensor = view.read(key).contiguous()
        view_bytes = safetensors_format.tensor_bytes(tensor)
        bar.advance(len(view_bytes))
        if len(view_bytes):
            yield view_bytes
        name = view.tensors[key].file
        remaining[name] -= 1
        if remaining[name] == 0:
            view.release(name)
            bar.file_done()


def _convert_to_file(view: ModelView, dst: str, bar: Progress) -> None:
    keys = view.keys_in_file_order()
    commit = atomic.FileCommit(dst).begin()
    with atomic.aborting_on_error(commit):
        if dst.lower().endswith(".safetensors"):
            header = safetensors_format.build_header(
                [(k, view.tensors[k].dtype, view.tensors[k].shape) for k in keys], {"format": "pt"}
            )

            def chunks():
                yield header
                yield from _tensor_stream(view, keys, bar)

            record = commit.writer.write(commit.staging_name, chunks())
        else:
            # torch.save needs the whole dict: a single .bin holds every tensor in memory at once.
            tensors = [(k, view.read(k)) for k in keys]
            record = write_weights_file(commit.writer, commit.staging_name, tensors, use_safetensors=False)
            bar.advance(sum(t.numel() * t.element_size() for _, t in tensors))
        commit.commit(record)


def _convert_to_folder(view: ModelView, dst: str, fmt: str, max_shard_bytes: int, bar: Progress) -> None:
    opts = ModelSaveOptions(shard=True, max_shard_bytes=max_shard_bytes, use_safetensors=fmt == "safetensors")
    sizes = [(k, view.tensors[k].nbytes) for k in view.keys_in_file_order()]
    plan = plan_model_files(sizes, opts)
    extra = {}
    for name in (naming.HF_CONFIG, naming.HF_GENERATION_CONFIG):
        src = view.ck.folder / name
        if src.is_file() and (view.ck.is_sharded or Path(view.path).is_dir()):
            extra[name] = src.read_bytes()
    commit = atomic.FolderCommit(dst, owns=model_owned_files(None, extra)).begin()
    with atomic.aborting_on_error(commit):
        records = []
        for name, keys in plan.files:  # one destination shard in memory at a time
            tensors = [(k, view.read(k).contiguous()) for k in keys]
            records.append(write_weights_file(commit.writer, name, tensors, use_safetensors=opts.use_safetensors))
            bar.advance(sum(t.numel() * t.element_size() for _, t in tensors))
            bar.file_done()
            del tensors
        records += write_model_metadata(commit.writer, plan, opts, extra_files=extra)
        commit.commit(records)


@main.command()
@click.argument("src", callback=_checkpoint_arg)
@click.argument("dst", callback=_checkpoint_arg)
@click.option(
    "--size-per-shard",
    type=click.FloatRange(min=0, min_open=True),
    default=1024,
    show_default=True,
    help="Largest shard in MiB when DST is a folder.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "bin"]),
    default="safetensors",
    show_default=True,
    help="File format when DST is a folder (a single-file DST takes its format from its suffix).",
)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (atomically).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def convert(src: str, dst: str, size_per_shard: float, fmt: str, overwrite: bool, quiet: bool) -> None:
    """Rewrite the model checkpoint SRC as DST, in Hugging Face layout.

    \b
    DST ending in .safetensors or .bin  -> one file (a sharded SRC is consolidated)
    any other DST                       -> a folder of shards of at most --size-per-shard MiB
                                           with an index JSON (re-sharding, .bin <-> safetensors,
                                           ColossalAI layout -> Hugging Face layout)

    Tensors are read shard by shard: at most one destination shard is in memory at a time
    (a single .safetensors DST streams tensor by tensor; a single .bin DST needs them all,
    since torch.save does). config.json and generation_config.json are copied along.
    """
    if not overwrite and (_remote_exists(dst) if is_url(dst) else os.path.exists(dst)):
        raise BadInput(f"{dst}: already exists; pass --overwrite to replace it")
    if not is_url(src) and not is_url(dst) and os.path.abspath(src) == os.path.abspath(dst):
        raise BadInput("SRC and DST are the same path")
    with _local(src, quiet=quiet) as local_src:
        view = _open_model(local_src)
        try:
            total = sum(e.nbytes for e in view.tensors.values())
            if is_url(dst):
                from ckptio.storage.fsspec_storage import saving

                with saving(dst, quiet=quiet) as local_dst:
                    _run_convert(view, local_dst, size_per_shard, fmt, total, quiet)
            else:
                _run_convert(view, dst, size_per_shard, fmt, total, quiet)
        except CheckpointError as exc:
            raise BadInput(str(exc)) from exc
        finally:
            view.close()
    if not quiet:
        click.echo(f"wrote {dst} ({len(view.tensors)} tensors, {_human(total)})")


def _remote_exists(url: str) -> bool:
    from ckptio.storage.fsspec_storage import exists

    return exists(url)


def _run_convert(view: ModelView, dst: str, size_per_shard: float, fmt: str, total: int, quiet: bool) -> None:
    with Progress(f"convert -> {Path(dst).name}", total, len(view.ck.files), quiet=quiet) as bar:
        if _is_single_file(dst):
            _convert_to_file(view, dst, bar)
        else:
            _convert_to_folder(view, dst, fmt, max(1, int(size_per_shard * MiB)), bar)


# ----------------------------------------------------------------------------- diff
def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.dtype == torch.bool:
        return float((a != b).any())
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    wide = torch.float64 if a.dtype in (torch.float64, torch.int64, torch.int32, torch.uint64) else torch.float32
    x, y = a.to(wide), b.to(wide)
    both_nan = torch.isnan(x) & torch.isnan(y)
    d = (x - y).abs().masked_fill(both_nan, 0)
    if d.numel() == 0:
        return 0.0
    return float(d.max())


@main.command()
@click.argument("a", callback=_checkpoint_arg)
@click.argument("b", callback=_checkpoint_arg)
@click.option("--atol", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Largest allowed |a - b|.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line; no progress bar.")
def diff(a: str, b: str, atol: float, as_json: bool, quiet: bool) -> None:
    """Compare the tensors of two model checkpoints, in any formats and layouts.

    Reports keys only in one side, dtype or shape differences, and the largest absolute
    difference per tensor. Exit code 0 only when both hold the same keys, dtypes and shapes
    and every value is equal (or within --atol); 1 otherwise.
    """
    with _local(a, quiet=quiet) as la, _local(b, quiet=quiet) as lb:
        va, vb = _open_model(la), _open_model(lb)
        try:
            report = _diff(va, vb, atol)
        finally:
            va.close()
            vb.close()
    report.update({"a": a, "b": b, "atol": atol})
    same = report["equal"]
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        if not quiet:
            for k in report["only_in_a"]:
                click.echo(f"only in A   {k}")
            for k in report["only_in_b"]:
                click.echo(f"only in B   {k}")
            for m in report["mismatched"]:
                click.echo(f"mismatch    {m['name']}: A {m['a']} vs B {m['b']}")
            for d in report["different"]:
                click.echo(f"differs     {d['name']}: max |a-b| = {d['max_abs_diff']:.6g}")
        click.echo(
            f"{report['compared']} tensors compared: {report['identical']} identical, "
            f"{len(report['different'])} differ beyond atol={atol:g} (max |a-b| = {report['max_abs_diff']:.6g}), "
            f"{len(report['mismatched'])} dtype/shape mismatches, "
            f"{len(report['only_in_a'])} only in A, {len(report['only_in_b'])} only in B -> "
            f"{'EQUAL' if same else 'DIFFERENT'}"
        )
    sys.exit(EXIT_OK if same else EXIT_FAILED)


def _diff(va: ModelView, vb: ModelView, atol: float) -> dict:
    only_a = sorted(set(va.tensors) - set(vb.tensors))
    only_b = sorted(set(vb.tensors) - set(va.tensors))
    mismatched, different, identical, worst = [], [], 0, 0.0
    common = [k for k in va.keys_in_file_order() if k in vb.tensors]
    for key in common:
        ea, eb = va.tensors[key], vb.tensors[key]
        if ea.dtype != eb.dtype or ea.shape != eb.shape:
            mismatched.append(
                {
                    "name": key,
                    "a": f"{_dtype_name(ea.dtype)}{list(ea.shape)}",
                    "b": f"{_dtype_name(eb.dtype)}{list(eb.shape)}",
                }
            )
            continue
        ta, tb = va.read(key), vb.read(key)
        d = _max_abs_diff(ta, tb)
        del ta, tb
        worst = max(worst, d) if not math.isnan(d) else math.nan
        if d == 0:
            identical += 1
        if not d <= atol:
            different.append({"name": key, "max_abs_diff": d})
    return {
        "equal": not (only_a or only_b or mismatched or different),
        "compared": len(common),
        "identical": identical,
        "max_abs_diff": worst,
        "only_in_a": only_a,
        "only_in_b": only_b,
        "mismatched": mismatched,
        "different": different,
    }


if __name__ == "__main__":
    main()
