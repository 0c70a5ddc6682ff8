"""The pure write plan: the same size-bounded shards from any world size, owners balanced by bytes."""

from __future__ import annotations

from ckptio.engine.plan import plan_files

SIZES = [("a", 100), ("b", 40), ("c", 60), ("d", 10), ("e", 90)]


def test_files_do_not_depend_on_the_world_size():
    plans = [plan_files(SIZES, world, weights_name="model.safetensors", max_shard_bytes=100) for world in (1, 2, 3, 4)]
    assert all(p.files == plans[0].files for p in plans)
    # state order, packed greedily, numbered like Hugging Face
    assert plans[0].files == (
        ("model-00001-of-00003.safetensors", ("a",)),
        ("model-00002-of-00003.safetensors", ("b", "c")),
        ("model-00003-of-00003.safetensors", ("d", "e")),
    )
    assert plans[0].owners == (0, 0, 0)
    assert plans[0].total_size == 300 and sorted(plans[0].weight_map) == ["a", "b", "c", "d", "e"]


def test_owners_balanced_by_bytes():
    sizes = [("a", 100), ("b", 100), ("c", 50), ("d", 50)]
    plan = plan_files(sizes, 2, weights_name="model.safetensors", max_shard_bytes=100)
    loads = [0, 0]
    for (_, keys), owner in zip(plan.files, plan.owners):
        loads[owner] += sum(dict(sizes)[k] for k in keys)
    assert loads == [200, 100] or loads == [100, 200] or loads == [150, 150]
    assert max(loads) <= 200
    assert plan.files_of(1) == [i for i, o in enumerate(plan.owners) if o == 1]
    assert set(plan.owners) == {0, 1}


def test_more_ranks_than_files_and_empty_state():
    plan = plan_files([("a", 5)], 4, weights_name="pytorch_model.bin", max_shard_bytes=10)
    assert plan.files == (("pytorch_model-00001-of-00001.bin", ("a",)),) and plan.owners == (0,)
    empty = plan_files([], 3, weights_name="model.safetensors", max_shard_bytes=10)
    assert empty.files == (("model-00001-of-00001.safetensors", ()),) and empty.owners == (0,)
    none = plan_files([], 3, weights_name="optimizer.safetensors", max_shard_bytes=10, empty_file=False)
    assert none.files == () and none.weight_map == {}


def test_single_file_is_written_by_one_rank():
    plan = plan_files([("a", 5), ("b", 7)], 3, weights_name="w.bin", max_shard_bytes=1, shard=False)
    assert plan.files == (("w.bin", ("a", "b")),) and plan.owners == (0,) and plan.weight_map is None


def test_static_tensors_get_shards_of_their_own_whatever_the_world_size():
    """Frozen tensors never share a file with trained ones (such a file would change at every save)."""
    sizes = [("a", 40), ("f1", 50), ("b", 40), ("f2", 30), ("c", 70)]
    plans = [
        plan_files(sizes, world, weights_name="model.safetensors", max_shard_bytes=100, static={"f1", "f2"})
        for world in (1, 2, 4)
    ]
    assert all(p.files == plans[0].files for p in plans)
    assert plans[0].files == (
        ("model-00001-of-00003.safetensors", ("f1", "f2")),
        ("model-00002-of-00003.safetensors", ("a", "b")),
        ("model-00003-of-00003.safetensors", ("c",)),
    )
    assert plans[0].total_size == 230
    # nothing static: the plan of before, byte for byte
    assert (
        plan_files(sizes, 2, weights_name="m.safetensors", max_shard_bytes=100, static=()).files
        == plan_files(sizes, 2, weights_name="m.safetensors", max_shard_bytes=100).files
    )
    everything = plan_files(sizes, 1, weights_name="m.safetensors", max_shard_bytes=1000, static={k for k, _ in sizes})
    assert everything.files == (("m-00001-of-00001.safetensors", ("a", "f1", "b", "f2", "c")),)
