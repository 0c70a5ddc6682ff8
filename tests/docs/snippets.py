"""The ```python blocks of the README and docs/*.md, and how to run them as the README says.

Convention (stated in the README's Quick start): the blocks under one ``##`` heading run in
order in one fresh Python session, after the file's first block (which builds a tiny
model). A block that cannot run is marked by ``<!-- not run: REASON -->`` on the line
before its fence.

Run as a script, this module executes one section in a fresh interpreter for the exact-resume
test: ``python tests/docs/snippets.py FILE HEADING OUT [--kill-at N]`` appends the loss
returned by every ``train_step`` call to ``OUT/losses.txt`` (exact float bits, one per line,
flushed, so a killed run leaves its losses), kills itself with SIGKILL before its N-th call
(an injection from outside the snippets), and at the end writes the model's weights to
``OUT/final.pt``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_HEADING = re.compile(r"^## (.+?)\s*$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    file: Path
    line: int  # 1-based line of the first code line
    heading: str  # the ``##`` heading it is under ("" before the first one)
    code: str  # dedented
    not_run: str | None  # the reason given by a ``<!-- not run: ... -->`` marker

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """Every ```python block of a Markdown file, in order."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    heading, i = "", 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            heading_match = _HEADING.match(lines[i])
            if heading_match:
                heading = heading_match.group(1)
            i += 1
            continue
        indent, lang = match.groups()
        end = next(
            (j for j in range(i + 1, len(lines)) if lines[j].strip() == "```" and lines[j].startswith(indent)),
            len(lines),
        )
        if lang == "python":
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = _NOT_RUN.match(before)
            code = textwrap.dedent("\n".join(lines[i + 1 : end]))
            blocks.append(Block(Path(path).resolve(), i + 2, heading, code, marker.group(1) if marker else None))
        i = end + 1
    return blocks


def section(path: Path, heading: str) -> list[Block]:
    """The blocks that run for ``heading``: the file's first block, then the heading's own, in order
    (blocks marked ``not run`` left out)."""
    blocks = [b for b in python_blocks(path) if b.not_run is None]
    own = [b for b in blocks if b.heading == heading]
    if not own:
        raise LookupError(f"{path}: no ```python block under '## {heading}'")
    return own if blocks[0] in own else [blocks[0], *own]


def run_block(block: Block, namespace: dict[str, Any]) -> None:
    """Execute one block; tracebacks show the Markdown file and line."""
    if block.not_run is not None:
        raise RuntimeError(f"{block.where} is marked not to run ({block.not_run})")
    source = "\n" * (block.line - 1) + block.code
    exec(compile(source, str(block.file), "exec"), namespace)  # noqa: S102 (the README's own code)


def run_section(path: Path, heading: str, namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a section's blocks in order in one namespace (fresh unless given); returns it."""
    namespace = {"__name__": "__main__"} if namespace is None else namespace
    for block in section(path, heading):
        run_block(block, namespace)
    return namespace


def _record_train_steps(namespace: dict[str, Any], losses: Path, kill_at: int | None) -> None:
    """Wrap the snippets' ``train_step``: log each loss; SIGKILL this process before call ``kill_at``."""
    train_step = namespace["train_step"]
    calls = 0

    def recorded(batch):
        nonlocal calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        loss = train_step(batch)
        with open(losses, "a") as f:
            f.write(float(loss).hex() + "\n")
        return loss

    recorded.__wrapped__ = train_step
    namespace["train_step"] = recorded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("heading")
    parser.add_argument("out", type=Path, help="folder for losses.txt and final.pt")
    parser.add_argument("--kill-at", type=int, default=None, help="SIGKILL before this train_step call (1-based)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for block in section(args.file, args.heading):
        run_block(block, namespace)
        if "train_step" in namespace and not hasattr(namespace["train_step"], "__wrapped__"):
            _record_train_steps(namespace, args.out / "losses.txt", args.kill_at)
    state = {k: v.detach().clone() for k, v in namespace["model"].state_dict().items()}
    torch.save(state, args.out / "final.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
