"""Who holds and who writes which box, worked out on one rank from the mesh and placements alone."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from ckptio.engine.spread import HeldSpread, Mesh, MeshSpread, WholeSpread, is_contiguous
from ckptio.engine.tensors import Region


def test_fsdp_like_shard0_over_4_ranks_uneven():
    spread = MeshSpread((10, 3), Mesh((0, 1, 2, 3), (4,)), (Shard(0),))
    boxes = [spread.box(r) for r in range(4)]
    assert [b.offset[0] for b in boxes] == [0, 3, 6, 9] and [b.shape[0] for b in boxes] == [3, 3, 3, 1]
    assert all(spread.writes(r) for r in range(4))
    assert spread.sources() == [(r, boxes[r]) for r in range(4)]
    assert spread.contiguous


def test_empty_shard_writes_nothing():
    spread = MeshSpread((5, 6), Mesh((0, 1, 2, 3), (4,)), (Shard(0),))
    assert [spread.box(r).shape[0] for r in range(4)] == [2, 2, 1, 0]
    assert not spread.writes(3) and [r for r, _ in spread.sources()] == [0, 1, 2]


def test_replicated_mesh_dim_sends_each_box_once_from_coordinate_zero():
    # a (dp=2, tp=2) mesh whose ranks are not in order; sharded on tp, replicated on dp
    mesh = Mesh((3, 1, 2, 0), (2, 2))
    spread = MeshSpread((4, 8), mesh, (Replicate(), Shard(1)))
    assert spread.box(3) == spread.box(2) == Region((0, 0), (4, 4))  # coordinates (0, 0) and (1, 0)
    assert spread.box(1) == spread.box(0) == Region((0, 4), (4, 4))
    assert [r for r in range(4) if spread.writes(r)] == [1, 3]
    assert spread.sources() == [(1, Region((0, 4), (4, 4))), (3, Region((0, 0), (4, 4)))]
    assert not spread.contiguous  # Shard(1) of a matrix: strided in the file


def test_ranks_outside_the_mesh_hold_nothing():
    spread = MeshSpread((4,), Mesh((2, 3), (2,)), (Shard(0),))
    assert spread.box(0).numel == 0 and not spread.writes(0)


@pytest.mark.parametrize(
    "region,contiguous",
    [
        (Region((1, 0), (2, 6)), True),  # rows
        (Region((0, 0), (4, 3)), False),  # columns
        (Region((2, 1), (1, 3)), True),  # part of one row
        (Region((0, 0), (4, 6)), True),  # everything
    ],
)
def test_contiguous_boxes(region, contiguous):
    assert is_contiguous(region, (4, 6)) is contiguous


def test_whole_and_held_spreads():
    whole, held = WholeSpread((2, 2), writer=1), HeldSpread((2, 2), holder=0)
    assert whole.box(0) == whole.box(1) == Region((0, 0), (2, 2)) and whole.sources() == [(1, Region((0, 0), (2, 2)))]
    assert held.box(1).numel == 0 and held.writes(0) and not held.writes(1)


def test_box_arithmetic_is_torchs():
    """The integer arithmetic equals torch's own for every coordinate of uneven, nested layouts."""
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    from ckptio.engine.spread import box_at

    cases = [
        ((10, 3), (4,), (Shard(0),)),
        ((5, 7), (2, 3), (Shard(0), Shard(1))),
        ((9, 4), (2, 3), (Shard(0), Shard(0))),  # two mesh dims cutting one tensor dim
        ((6, 10), (3, 2), (Replicate(), Shard(1))),
        ((1, 5), (4,), (Shard(0),)),
        ((7,), (2, 2), (Shard(0), Replicate())),
    ]
    for shape, mesh_shape, placements in cases:
        for flat in range(int(torch.tensor(mesh_shape).prod())):
            coordinate, rest = [], flat
            for size in reversed(mesh_shape):
                coordinate.append(rest % size)
                rest //= size
            coordinate = tuple(reversed(coordinate))
            local, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coordinate), placements)
            assert box_at(shape, mesh_shape, placements, coordinate) == Region(tuple(offset), tuple(local)), (
                shape,
                mesh_shape,
                placements,
                coordinate,
            )
