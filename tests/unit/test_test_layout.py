"""The test folders say what their tests are: ``-m dist`` selects every test that runs real
ranks and no other, and ``tests/dist`` holds only such tests."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
# starting processes that form a process group: the harness, torch's launchers, a hand-made group
MULTI_RANK = re.compile(r"run_ranks\(|start_processes\(|init_process_group\(|--nproc\b")
MARKED = re.compile(r"pytest\.mark\.dist\b")


def _test_files():
    return [p for p in TESTS.rglob("test_*.py") if p != Path(__file__).resolve()]


def test_every_multi_rank_test_file_carries_the_dist_marker():
    unmarked = [
        str(p.relative_to(TESTS))
        for p in _test_files()
        if p.parent.name != "dist" and MULTI_RANK.search(p.read_text()) and not MARKED.search(p.read_text())
    ]
    assert not unmarked, f"multi-rank tests without @pytest.mark.dist (or pytestmark): {unmarked}"


def test_the_dist_folder_holds_multi_rank_tests_only():
    single = [
        str(p.relative_to(TESTS)) for p in (TESTS / "dist").glob("test_*.py") if not MULTI_RANK.search(p.read_text())
    ]
    assert not single, f"tests/dist marks everything as multi-rank, but these run in one process: {single}"
