"""The shard splitter and owner assignment are pure: tested with plain numbers."""

import pytest

from ckptio.engine.split import assign_owners, split_greedy


def test_greedy_packs_in_order_and_starts_new_shard_on_overflow():
    plan = split_greedy([("a", 4), ("b", 4), ("c", 4), ("d", 1)], 8)
    assert plan.shards == (("a", "b"), ("c", "d"))
    assert plan.shard_bytes == (8, 5)
    assert plan.total_bytes == 13


def test_oversized_item_gets_a_shard_of_its_own():
    plan = split_greedy([("small", 2), ("huge", 100), ("tail", 2)], 10)
    assert plan.shards == (("small",), ("huge",), ("tail",))


def test_oversized_first_item_is_alone_too():
    plan = split_greedy([("huge", 100), ("a", 1), ("b", 1)], 10)
    assert plan.shards == (("huge",), ("a", "b"))


def test_empty_input_gives_one_empty_shard():
    assert split_greedy([], 10).shards == ((),)


def test_zero_sized_items_stay_with_neighbours():
    assert split_greedy([("a", 10), ("z", 0), ("b", 1)], 10).shards == (("a", "z"), ("b",))


@pytest.mark.parametrize("bad", [0, -1])
def test_rejects_non_positive_limit(bad):
    with pytest.raises(ValueError, match="positive"):
        split_greedy([("a", 1)], bad)


def test_owners_balance_bytes_and_are_deterministic():
    sizes = [100, 60, 50, 40, 10]
    owners = assign_owners(sizes, 2)
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert sorted(loads) == [120, 140]
    assert owners == assign_owners(sizes, 2)


def test_owners_with_more_ranks_than_items():
    assert sorted(assign_owners([5, 3], 4)) == [0, 1]
