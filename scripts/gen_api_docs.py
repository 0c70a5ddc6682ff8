"""Write docs/api.md, the API reference, from the docstrings of ckptio's public calls.

    PYTHONPATH=src .venv/bin/python scripts/gen_api_docs.py          # rewrite docs/api.md
    PYTHONPATH=src .venv/bin/python scripts/gen_api_docs.py --check  # exit 1 when it is stale

The public surface is the list below (what README and the package ``__all__`` lists name).
A docstring's ``Args:`` / ``Returns:`` / ``Raises:`` sections become lists; ``:role:`x```
becomes ``x``. ``tests/docs/test_api_docs.py`` fails when docs/api.md differs from what this
script writes, or when a public call lacks an ``Args:`` entry for one of its arguments.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "api.md"

# (module, names, one line about the module)
API: list[tuple[str, list[str], str]] = [
    ("ckptio", ["Booster"], "The entry point, with ColossalAI's method names and defaults."),
    (
        "ckptio",
        ["CheckpointIO", "GeneralCheckpointIO"],
        "What a Booster saves and loads through (``booster.checkpoint_io``).",
    ),
    (
        "ckptio.checkpoint_io.distributed",
        ["DistributedCheckpointIO"],
        "The same CheckpointIO on a process group (what the plugins return).",
    ),
    ("ckptio.plugins", ["Plugin", "TorchDDPPlugin", "TorchFSDPPlugin", "HybridParallelPlugin"], "Parallel layouts."),
    ("ckptio", ["CheckpointManager"], "Rotation and resume on top of the training checkpoints."),
    (
        "ckptio.training",
        [
            "save_checkpoint",
            "load_checkpoint",
            "save_json",
            "load_json",
            "StatefulDistributedSampler",
            "capture_rng_state",
            "restore_rng_state",
        ],
        "Training checkpoints (ColossalChat's ``coati.utils.ckpt_io`` API).",
    ),
    (
        "ckptio.tools",
        ["inspect_checkpoint", "verify_checkpoint", "convert_checkpoint", "diff_checkpoints"],
        "What the ``ckptio`` command prints, as library functions returning data.",
    ),
    ("ckptio.state_dict", ["save_state_dict", "load_state_dict", "load_into"], "Plain dicts of tensors, no model."),
    ("ckptio", ["DistCoordinator", "LoadReport"], "Helpers."),
    (
        "ckptio.errors",
        [
            "CheckpointError",
            "CheckpointNotFoundError",
            "CheckpointFormatError",
            "CheckpointCorruptError",
            "UnsafeCheckpointError",
            "StateMismatchError",
            "CheckpointWriteError",
            "CheckpointExistsError",
            "DistributedCheckpointError",
        ],
        "Every error ckptio raises (each also inherits the closest builtin exception).",
    ),
]
_SECTIONS = ("Args", "Returns", "Raises", "Yields", "Example", "Examples")
_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def _documented_classes() -> list[type]:
    classes = []
    for module_name, names, _ in API:
        module = importlib.import_module(module_name)
        classes += [getattr(module, n) for n in names if inspect.isclass(getattr(module, n))]
    return classes


def documented_base(cls: type) -> type | None:
    """The nearest base class with its own section: its calls are documented there."""
    classes = _documented_classes()
    return next((b for b in cls.__mro__[1:] if b in classes), None)


def public_members(cls: type) -> list[tuple[str, object]]:
    """Methods and properties a user calls: defined by this class or a ckptio base class that
    has no section of its own, not ``_private``, not inherited from torch or ``object``; a
    method that only overrides one of a documented base is described there."""
    base = documented_base(cls)
    inherited = set(dir(base)) if base is not None else set()
    seen: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("ckptio") or (base is not None and issubclass(base, klass)):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in inherited:
                continue
            if isinstance(value, staticmethod | classmethod):
                value = value.__func__
            if callable(value) or isinstance(value, property):
                seen[name] = value
            elif name in seen:
                del seen[name]
    return list(seen.items())


def documented() -> list[tuple[str, object, object | None]]:
    """``(qualified name, object, owner class or None)`` of every documented call, in order."""
    out = []
    for module_name, names, _ in API:
        module = importlib.import_module(module_name)
        for name in names:
            obj = getattr(module, name)
            out.append((f"{module_name}.{name}", obj, None))
            if inspect.isclass(obj) and not issubclass(obj, BaseException):
                for member, value in public_members(obj):
                    out.append((f"{module_name}.{name}.{member}", value, obj))
    return out


def parameters(obj: object, owner: type | None) -> list[str]:
    """The argument names a docstring must describe (``self``/``cls`` left out)."""
    if isinstance(obj, property):
        return []
    if inspect.isclass(obj) and "__init__" not in vars(obj) and documented_base(obj) is not None:
        return []  # constructed like its documented base
    target = obj.__init__ if inspect.isclass(obj) else obj
    if inspect.isclass(obj) and target is object.__init__:
        return []
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    names = [p.name for p in sig.parameters.values()]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return names


def docstring(obj: object) -> str:
    doc = inspect.getdoc(obj.fget if isinstance(obj, property) else obj) or ""
    return doc


def _annotation(value: object) -> str:
    if value is inspect.Parameter.empty:
        return ""
    return value if isinstance(value, str) else inspect.formatannotation(value)


def _signature(name: str, obj: object) -> str:
    """``name(arg: type = default, *, other: type = default) -> result``, as the source spells
    the types (``from __future__ import annotations`` keeps them as text)."""
    short = name.rsplit(".", 1)[-1]
    if isinstance(obj, property):
        return f"{short}  # property"
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return short
    params = list(sig.parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    parts: list[str] = []
    star_done = False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        prefix = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        star_done = star_done or p.kind is p.VAR_POSITIONAL
        text = prefix + p.name
        if annotation := _annotation(p.annotation):
            text += f": {annotation}"
        if p.default is not inspect.Parameter.empty:
            text += f" = {p.default!r}" if annotation else f"={p.default!r}"
        parts.append(text)
    text = f"{short}({', '.join(parts)})"
    returns = _annotation(sig.return_annotation)
    if returns and not inspect.isclass(obj):
        text += f" -> {returns}"
    if " at 0x" in text:
        raise ValueError(f"{name}: a default value prints its address, the reference would never be stable: {text}")
    return text


def _markdown(doc: str) -> list[str]:
    """A Google-style docstring as Markdown: sections become bold labels and bullet lists."""
    lines: list[str] = []
    section = None
    doc = _ROLE.sub(r"`\1`", doc).replace("``", "`")
    for raw in doc.splitlines():
        stripped = raw.strip()
        header = stripped[:-1] if stripped.endswith(":") else None
        if header in _SECTIONS and not raw.startswith(" "):
            section = header
            lines += ["", f"**{header}:**", ""]
            continue
        if section is not None and raw.startswith("    ") and not raw.startswith("        "):
            entry = re.match(r"(\*{0,2}\w+)(?: \(([^)]*)\))?: (.*)", stripped) if section == "Args" else None
            lines.append(f"- `{entry.group(1)}`: {entry.group(3)}" if entry else f"- {stripped}")
            continue
        if section is not None and raw.startswith("        "):
            lines[-1] += f" {stripped}"
            continue
        if section is not None and stripped:
            section = None
            lines.append("")
        lines.append(stripped)
    return lines


def render() -> str:
    out = [
        "# ckptio API reference",
        "",
        "Generated from the docstrings by `scripts/gen_api_docs.py`; do not edit by hand (a test",
        "fails when this file is stale). The README shows the calls in use.",
        "",
    ]
    for module_name, names, about in API:
        out += [f"## `{module_name}`: {', '.join(names)}", "", about.replace("``", "`"), ""]
        module = importlib.import_module(module_name)
        for name in names:
            obj = getattr(module, name)
            kind = "class" if inspect.isclass(obj) else "function"
            out += [f"### {kind} `{module_name}.{name}`", "", "```text", _signature(name, obj), "```", ""]
            out += _markdown(docstring(obj)) + [""]
            base = documented_base(obj) if inspect.isclass(obj) else None
            if base is not None and not issubclass(obj, BaseException):
                out += [f"Inherits the calls of `{base.__module__}.{base.__name__}`.", ""]
            if inspect.isclass(obj) and not issubclass(obj, BaseException):
                for member, value in public_members(obj):
                    out += [f"#### `{name}.{member}`", "", "```text", _signature(member, value), "```", ""]
                    out += _markdown(docstring(value)) + [""]
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/api.md differs; write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run scripts/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
