"""The pure write plan: balanced owners, size-bounded shards, global HF numbering."""

from __future__ import annotations

from ckptio.planning.plan import plan_owned_files


def test_owners_balanced_and_files_numbered_globally():
    sizes = [("a", 100), ("b", 40), ("c", 60), ("d", 10), ("e", 90)]
    plan = plan_owned_files(sizes, 2, weights_name="model.safetensors", max_shard_bytes=100)
    assert [name for name, _ in plan.files] == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    loads = [0, 0]
    for (_, keys), owner in zip(plan.files, plan.owners):
        loads[owner] += sum(dict(sizes)[k] for k in keys)
        assert sum(dict(sizes)[k] for k in keys) <= 100 or len(keys) == 1
    assert loads == [150, 150]
    assert sorted(plan.weight_map) == ["a", "b", "c", "d", "e"]
    assert plan.total_size == 300
    assert plan.files_of(1) == [i for i, o in enumerate(plan.owners) if o == 1]


def test_more_ranks_than_tensors_and_empty_state():
    plan = plan_owned_files([("a", 5)], 4, weights_name="pytorch_model.bin", max_shard_bytes=10)
    assert plan.files == (("pytorch_model-00001-of-00001.bin", ("a",)),) and plan.owners == (0,)
    empty = plan_owned_files([], 3, weights_name="model.safetensors", max_shard_bytes=10)
    assert empty.files == (("model-00001-of-00001.safetensors", ()),) and empty.owners == (0,)


def test_single_file_is_written_by_one_rank():
    plan = plan_owned_files([("a", 5), ("b", 7)], 3, weights_name="w.bin", max_shard_bytes=1, shard=False)
    assert plan.files == (("w.bin", ("a", "b")),) and plan.owners == (0,) and plan.weight_map is None
