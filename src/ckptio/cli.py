"""The ``ckptio`` command: look inside, check, convert and compare checkpoints without Python.

Wiring only: each command calls :mod:`ckptio.tools` and prints what it returns. Every command
takes a local path or an fsspec URL (``s3://bucket/run/ckpt``). Exit codes: 0 all good, 1 the
check failed (``verify`` found a problem, ``diff`` found a difference), 2 bad input (missing
path, unreadable checkpoint, no checkpoint there, wrong option). With ``--json`` every outcome
is one JSON object on stdout, errors included (``{"error": ..., "path": ...}``, exit code 2), so
a script reads stdout whatever happened; without it errors go to stderr as ``error: ...``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from ckptio.errors import CheckpointError
from ckptio.storage.location import exists, is_url, local_path
from ckptio.tools import convert_checkpoint, diff_checkpoints, inspect_checkpoint, verify_checkpoint
from ckptio.tools.convert import key_map_from_expressions

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


_JSON = "ckptio.json"  # ctx.meta key (shared by the group's and the command's contexts): --json given


class BadInput(click.ClickException):
    """A problem with what the user passed: ``error: ...`` on stderr, or with ``--json`` the
    object ``{"error": ..., "path": ...}`` on stdout; exit code 2."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, path: str | None = None, as_json: bool = False) -> None:
        super().__init__(message)
        self.path = path
        self.as_json = as_json

    def show(self, file=None) -> None:
        if self.as_json:
            click.echo(json.dumps({"error": self.format_message(), "path": self.path}, indent=1))
        else:
            click.echo(f"error: {self.format_message()}", err=True)


def _remember_json(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[_JSON] = True
    return value


def _json_option(help: str):
    """``--json``, parsed before the other arguments so that their errors are JSON too."""
    return click.option("--json", "as_json", is_flag=True, is_eager=True, callback=_remember_json, help=help)


def _checkpoint_arg(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Every command's path, normalised once as it is parsed: ``file:///x`` is the local ``/x``."""
    try:
        return local_path(value)
    except CheckpointError as exc:
        raise BadInput(str(exc), path=value) from exc


def _must_exist(path: str) -> None:
    """A local path that is not there; a URL's problems come from reading it (an incomplete save says so)."""
    if not is_url(path) and not exists(path):
        raise BadInput(f"{path}: no such file or folder", path=path)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


class _Group(click.Group):
    """Turns a checkpoint error anywhere in a command into ``error: ...`` and exit code 2."""

    def invoke(self, ctx: click.Context):
        as_json = lambda: bool(ctx.meta.get(_JSON))  # noqa: E731 (set while the command's options parse)
        try:
            return super().invoke(ctx)
        except BadInput as exc:
            exc.as_json = as_json()
            raise
        except click.UsageError as exc:
            if not as_json():
                raise
            raise BadInput(exc.format_message(), as_json=True) from exc
        except CheckpointError as exc:
            raise BadInput(str(exc), path=exc.path, as_json=as_json()) from exc
        except BrokenPipeError:  # output piped into `head`: stop quietly, as Unix tools do
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (nothing more may reach the closed pipe)
            ctx.exit(0)
        except OSError as exc:
            path = None if exc.filename is None else os.fspath(exc.filename)
            message = str(exc.strerror or exc) if path is None else f"{path}: {exc.strerror or exc}"
            raise BadInput(message, path=path, as_json=as_json()) from exc


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


# ----------------------------------------------------------------------------- inspect
@main.command()
@click.argument("path", callback=_checkpoint_arg)
@click.option("--tensors", is_flag=True, help="Also list every tensor with its dtype, shape and file.")
@_json_option("Print one JSON object (for scripts) instead of text, errors too.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar while downloading a URL.")
def inspect(path: str, tensors: bool, as_json: bool, quiet: bool) -> None:
    """Show what a checkpoint holds: format, files, tensor count, parameters, bytes and dtypes.

    Only file headers are read, never the tensor data (a .bin file is memory-mapped).
    """
    _must_exist(path)
    report = inspect_checkpoint(path, tensors=tensors)
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    kind = report["kind"]
    if kind == "training":
        _print_training(report)
    elif kind == "training runs":
        _print_runs(report)
    elif kind == "optimizer":
        click.echo(_optimizer_text(report))
    elif kind == "lr_scheduler":
        click.echo(f"checkpoint   {report['path']}")
        click.echo(f"kind         LR scheduler state ({report['layout']}), {_human(report['file_bytes'])}")
    else:
        _print_model(report)


def _print_model(s: dict) -> None:
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


def _optimizer_text(s: dict) -> str:
    entries = f"{s['entries']} in the index" if s["entries"] is not None else "one torch file"
    lines = [
        f"checkpoint   {s['path']}",
        f"kind         optimizer, {s['layout']} layout ({s['index']})",
        f"manifest     {'ckptio_manifest.json' if s['ckptio_manifest'] else 'none'}",
        f"entries      {entries}",
        f"bytes        {_human(s['file_bytes'])} in {len(s['files'])} files",
        "",
    ]
    rows = [[f["name"], _human(f["bytes"])] for f in s["files"]]
    widths = [max(len(r[i]) for r in [["file", "size"], *rows]) for i in (0, 1)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [["file", "size"], *rows]]
    return "\n".join(lines)


def _print_training(report: dict) -> None:
    running = report["running_states"]
    click.echo(f"checkpoint   {report['path']}")
    click.echo(
        f"training     epoch {running.get('epoch')}, step {running.get('step')}, "
        f"sample_start_index {running.get('sample_start_index')}, saved on {running.get('world_size', 1)} rank(s)"
    )
    click.echo("")
    _print_model(report["model"])
    if report["optimizer"] is not None:
        click.echo("")
        click.echo(_optimizer_text(report["optimizer"]))


def _print_runs(report: dict) -> None:
    rows = report["checkpoints"]
    click.echo(f"folder       {report['path']}: {len(rows)} training checkpoint(s)")
    click.echo("")
    _print_table(
        [[r["name"], r["state"], str(r["files"]), _human(r["bytes"])] for r in rows],
        ["checkpoint", "state", "files", "size"],
    )


# ----------------------------------------------------------------------------- verify
@main.command()
@click.argument("path", callback=_checkpoint_arg)
@click.option("--no-checksums", is_flag=True, help="Check sizes only (fast); skip re-hashing every byte.")
@_json_option("Print one JSON object instead of text, errors too.")
@click.option("-q", "--quiet", is_flag=True, help="Print only problems; no progress bar.")
def verify(path: str, no_checksums: bool, as_json: bool, quiet: bool) -> None:
    """Check a checkpoint: file sizes and checksums (against ckptio's manifest), every index
    entry present in its shard, and every file header readable.

    Exit code 0 only when everything is fine, 1 when a problem was found.
    """
    _must_exist(path)
    ok, problems = verify_checkpoint(path, checksums=not no_checksums)
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
@click.option(
    "--key-map",
    "key_map",
    multiple=True,
    metavar="EXPR",
    help="Rename keys on the way, sed-like, Python regex; repeat to chain: 's/^model\\.//' strips a prefix, "
    "'s/\\.wq\\./.q_proj./g' renames, '/freqs_cis$/d' leaves keys out.",
)
@_json_option("Print one JSON object (what was written, or the error) instead of text.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def convert(
    src: str,
    dst: str,
    size_per_shard: float,
    fmt: str,
    overwrite: bool,
    key_map: tuple[str, ...],
    as_json: bool,
    quiet: bool,
) -> None:
    """Rewrite the model checkpoint SRC as DST, in Hugging Face layout.

    \b
    DST ending in .safetensors or .bin  -> one file (a sharded SRC is consolidated)
    any other DST                       -> a folder of shards of at most --size-per-shard MiB
                                           with an index JSON (re-sharding, .bin <-> safetensors,
                                           ColossalAI layout or a torch.distributed.checkpoint /
                                           torchtitan folder -> Hugging Face layout)

    Tensors are read as they are written: into safetensors files in pieces of at most 16 MiB
    from safetensors or DCP sources (whole tensors from .bin ones), so memory stays small
    whatever the model size; a .bin DST holds one of its files' tensors at a time (torch.save
    needs them all). config.json and generation_config.json are copied along.
    """
    _must_exist(src)
    try:
        mapping = key_map_from_expressions(key_map) if key_map else None
    except ValueError as exc:
        raise BadInput(str(exc)) from exc
    quiet = quiet or as_json
    result = convert_checkpoint(
        src, dst, size_per_shard=size_per_shard, fmt=fmt, overwrite=overwrite, quiet=quiet, key_map=mapping
    )
    if as_json:
        click.echo(json.dumps({"src": src, "dst": dst, **result}, indent=1))
    elif not quiet:
        click.echo(f"wrote {dst} ({result['tensors']} tensors, {_human(result['bytes'])})")


# ----------------------------------------------------------------------------- diff
@main.command()
@click.argument("a", callback=_checkpoint_arg)
@click.argument("b", callback=_checkpoint_arg)
@click.option("--atol", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Largest allowed |a - b|.")
@_json_option("Print one JSON object instead of text, errors too.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line; no progress bar.")
def diff(a: str, b: str, atol: float, as_json: bool, quiet: bool) -> None:
    """Compare the tensors of two model checkpoints, in any formats and layouts.

    Reports keys only in one side, dtype or shape differences, and the largest absolute
    difference per tensor. Exit code 0 only when both hold the same keys, dtypes and shapes
    and every value is equal (or within --atol); 1 otherwise.
    """
    _must_exist(a)
    _must_exist(b)
    report = diff_checkpoints(a, b, atol=atol)
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


if __name__ == "__main__":
    main()
