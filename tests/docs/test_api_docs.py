"""docs/api.md is what scripts/gen_api_docs.py writes from the docstrings, and every public
call's docstring describes each of its arguments (``help(Booster.save_model)`` says what
``shard`` does)."""

from __future__ import annotations

import importlib.util
import re

import pytest
from tests.docs.snippets import ROOT

_spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts" / "gen_api_docs.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


def test_api_reference_is_up_to_date():
    current = (ROOT / "docs" / "api.md").read_text() if (ROOT / "docs" / "api.md").exists() else ""
    assert current == gen.render(), (
        "docs/api.md is stale: run `PYTHONPATH=src .venv/bin/python scripts/gen_api_docs.py` and commit it"
    )


def _args_section(doc: str) -> set[str]:
    """Argument names listed under ``Args:`` (``name:`` or ``name (type):`` at the first indent)."""
    match = re.search(r"^Args:\n((?:(?: {4}.*)?\n?)+)", doc, re.M)
    if not match:
        return set()
    return set(re.findall(r"^ {4}\*{0,2}(\w+)(?: \([^)]*\))?:", match.group(1), re.M))


CALLS = gen.documented()


@pytest.mark.parametrize("name,obj,owner", CALLS, ids=[c[0] for c in CALLS])
def test_every_public_call_documents_each_argument(name, obj, owner):
    doc = gen.docstring(obj)
    assert doc.strip(), f"{name} has no docstring"
    wanted = gen.parameters(obj, owner)
    missing = [p for p in wanted if p not in _args_section(doc)]
    assert not missing, f"{name}: its docstring's Args: section does not describe {missing}"


def test_readme_links_the_api_reference():
    assert "(docs/api.md)" in (ROOT / "README.md").read_text()
