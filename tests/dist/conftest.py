"""Every test in this folder is a multi-rank test (``-m dist`` selects them, ``-m "not dist"`` skips)."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items):
    for item in items:
        if _HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.dist)
