"""Which rank holds which box of a tensor, worked out on any rank without asking the others.

A save on many ranks must know, for every tensor, who holds which part and who writes it.
Gathering every rank's boxes to every rank costs ranks x tensors of memory and traffic on
each rank; instead each rank derives what it needs from what every rank already knows: a
plain tensor is whole on every rank (a replica), a DTensor's boxes follow from its mesh and
placements (:class:`MeshSpread`, torch's own sharding arithmetic). Only layouts that are not
boxes of simple ``Shard``/``Replicate`` placements (strided shards) are exchanged
(:class:`ExchangedSpread`, their keys only).

Among ranks that hold the same box (replicas of a ``Replicate`` mesh dimension), the one at
coordinate 0 on those dimensions writes it or sends it, so each box is written or sent once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import lru_cache

from ckptio.engine.tensors import Region, StagedPart, is_dtensor

try:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover (very old torch)
    Replicate = Shard = None  # type: ignore[assignment,misc]
    _compute_local_shape_and_global_offset = None


class Spread:
    """How the ranks of a group hold one tensor of ``shape``."""

    shape: tuple[int, ...]

    def box(self, rank: int) -> Region:
        """The box ``rank`` (of the group) holds; empty when it holds none."""
        raise NotImplementedError

    def writes(self, rank: int) -> bool:
        """Whether ``rank`` is the one holder of its box that writes or sends it."""
        raise NotImplementedError

    def sources(self) -> list[tuple[int, Region]]:
        """Every distinct non-empty box with the rank that writes or sends it, by rank."""
        raise NotImplementedError

    @property
    def contiguous(self) -> bool:
        """Whether every box is one run of bytes in the row-major tensor."""
        return all(is_contiguous(region, self.shape) for _, region in self.sources())


def is_contiguous(region: Region, shape: tuple[int, ...]) -> bool:
    """Whether a box's elements are one run in row-major order: leading dims of extent 1, then
    one dim cut anywhere, then whole dims."""
    if not region.box:
        return False
    dims = len(shape)
    k = next((d for d in range(dims) if region.shape[d] != 1), dims)
    return all(region.shape[d] == shape[d] for d in range(k + 1, dims))


def _whole(shape: tuple[int, ...]) -> Region:
    return Region((0,) * len(shape), shape)


def _nothing(shape: tuple[int, ...]) -> Region:
    return Region((0,) * len(shape), (0,) * len(shape))


@dataclass(frozen=True)
class WholeSpread(Spread):
    """Every rank holds the whole tensor (a plain tensor under DDP or one process, a DTensor
    replicated over the whole group); ``writer`` writes or sends it. ``holders``: where only
    some ranks hold the key at all (pipeline stages), those ranks (None: every rank)."""

    shape: tuple[int, ...]
    writer: int
    holders: frozenset[int] | None = None

    def box(self, rank: int) -> Region:
        if self.holders is not None and rank not in self.holders:
            return _nothing(self.shape)
        return _whole(self.shape)

    def writes(self, rank: int) -> bool:
        return rank == self.writer

    def sources(self) -> list[tuple[int, Region]]:
        return [(self.writer, _whole(self.shape))] if math.prod(self.shape) else []

    @property
    def contiguous(self) -> bool:
        return True


@dataclass(frozen=True)
class HeldSpread(Spread):
    """One rank holds the whole tensor, the others nothing (a replica staged by its writer only)."""

    shape: tuple[int, ...]
    holder: int

    def box(self, rank: int) -> Region:
        return _whole(self.shape) if rank == self.holder else _nothing(self.shape)

    def writes(self, rank: int) -> bool:
        return rank == self.holder

    def sources(self) -> list[tuple[int, Region]]:
        return [(self.holder, _whole(self.shape))] if math.prod(self.shape) else []

    @property
    def contiguous(self) -> bool:
        return True


@dataclass(frozen=True, eq=False)
class Mesh:
    """A device mesh as group ranks: ``ranks`` in row-major order of ``shape``. One object per
    mesh is shared by all its tensors, so a spread costs O(1) memory, not O(ranks)."""

    ranks: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_position", {rank: i for i, rank in enumerate(self.ranks)})
        object.__setattr__(self, "digest", hash((self.ranks, self.shape)))

    def coordinate(self, rank: int) -> tuple[int, ...] | None:
        position = self._position.get(rank)
        if position is None:
            return None
        coordinate = []
        for size in reversed(self.shape):
            coordinate.append(position % size)
            position //= size
        return tuple(reversed(coordinate))

    def rank_at(self, coordinate: list[int]) -> int:
        flat = 0
        for c, size in zip(coordinate, self.shape):
            flat = flat * size + c
        return self.ranks[flat]


@dataclass(frozen=True)
class MeshSpread(Spread):
    """A DTensor of ``Shard``/``Replicate`` placements on a device mesh."""

    shape: tuple[int, ...]
    mesh: Mesh
    placements: tuple

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return self.mesh.shape

    def _coordinate(self, rank: int) -> tuple[int, ...] | None:
        return self.mesh.coordinate(rank)

    def _box_at(self, coordinate: tuple[int, ...]) -> Region:
        return box_at(self.shape, self.mesh.shape, self.placements, coordinate)

    def box(self, rank: int) -> Region:
        coordinate = self._coordinate(rank)
        return _nothing(self.shape) if coordinate is None else self._box_at(coordinate)

    def writes(self, rank: int) -> bool:
        coordinate = self._coordinate(rank)
        if coordinate is None:
            return False
        holds = bool(self._box_at(coordinate).numel)
        return holds and all(c == 0 for c, p in zip(coordinate, self.placements) if not isinstance(p, Shard))

    def sources(self) -> list[tuple[int, Region]]:
        """O(number of distinct boxes): only the shard dimensions of the mesh are walked."""
        shard_dims = [d for d, p in enumerate(self.placements) if isinstance(p, Shard)]
        out = []
        for index in range(math.prod(self.mesh_shape[d] for d in shard_dims) if shard_dims else 1):
            coordinate = [0] * len(self.mesh_shape)
            for d in reversed(shard_dims):
                coordinate[d] = index % self.mesh_shape[d]
                index //= self.mesh_shape[d]
            region = self._box_at(tuple(coordinate))
            if region.numel:
                out.append((self.mesh.rank_at(coordinate), region))
        return sorted(out, key=lambda item: item[0])

    @property
    def contiguous(self) -> bool:
        """Decided from the placements alone: one tensor dim is sharded and every dim before it
        has size 1 (``Shard(0)`` of a row-major tensor), so every box is one run."""
        dims = {p.dim for p in self.placements if isinstance(p, Shard)}
        if len(dims) > 1:
            return False
        return all(self.shape[d] == 1 for d in range(min(dims))) if dims else True


def _chunk(size: int, chunks: int, index: int) -> tuple[int, int]:
    """``(length, start)`` of chunk ``index`` of ``size`` elements cut like ``torch.chunk``
    (what ``Shard`` does: chunks of ``ceil(size / chunks)``, the last ones shorter or empty)."""
    if size % chunks == 0:
        length = size // chunks
        return length, length * index
    length = -(-size // chunks)
    start = length * index
    return max(0, min(size, start + length) - start), min(size, start)


@lru_cache(maxsize=65536)
def box_at(shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: tuple, coordinate: tuple) -> Region:
    """The box held at ``coordinate`` of a mesh under ``Shard``/``Replicate`` placements: torch's
    arithmetic (``Shard.local_shard_size_and_offset`` applied mesh dimension by mesh dimension),
    done on integers and cached, since a model repeats a few shapes over many tensors."""
    local, offset = list(shape), [0] * len(shape)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            length, start = _chunk(local[placement.dim], mesh_shape[mesh_dim], coordinate[mesh_dim])
            offset[placement.dim] += start
            local[placement.dim] = length
    return Region(tuple(offset), tuple(local))


@dataclass(frozen=True)
class ExchangedSpread(Spread):
    """Boxes gathered from every rank (layouts this module cannot work out alone)."""

    shape: tuple[int, ...]
    regions: tuple[Region, ...]

    def box(self, rank: int) -> Region:
        return self.regions[rank]

    def writes(self, rank: int) -> bool:
        return any(r == rank for r, _ in self.sources())

    def sources(self) -> list[tuple[int, Region]]:
        seen: dict[tuple, int] = {}
        for rank, region in enumerate(self.regions):
            key = (region.offset, region.shape)
            if region.numel and key not in seen:
                seen[key] = rank
        return [(rank, self.regions[rank]) for rank in sorted(seen.values())]


@dataclass(frozen=True, eq=False)
class AmongSpread(Spread):
    """A tensor only ``holders`` hold (ranks holding different keys: pipeline stages): ``inner``'s
    boxes on those ranks, nothing elsewhere. ``inner`` is worked out on the root mesh, whose other
    dimensions it takes for replicas (true within a stage, not across stages), so each distinct
    box is written or sent by its lowest holder."""

    inner: Spread
    holders: frozenset[int]

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return self.inner.shape

    def box(self, rank: int) -> Region:
        return self.inner.box(rank) if rank in self.holders else _nothing(self.shape)

    def writes(self, rank: int) -> bool:
        return rank in self._writers

    def sources(self) -> list[tuple[int, Region]]:
        return self._sources

    @functools.cached_property
    def _sources(self) -> list[tuple[int, Region]]:
        seen: dict[tuple, tuple[int, Region]] = {}
        for rank in sorted(self.holders):
            region = self.inner.box(rank)
            if region.numel:
                seen.setdefault((region.offset, region.shape), (rank, region))
        return sorted(seen.values(), key=lambda item: item[0])

    @functools.cached_property
    def _writers(self) -> frozenset[int]:
        return frozenset(rank for rank, _ in self._sources)

    @property
    def contiguous(self) -> bool:
        return self.inner.contiguous


def describe(spread: Spread | str | None) -> object:
    """What every rank must agree on about a tensor's spread (compared through one digest)."""
    if isinstance(spread, MeshSpread):
        return ("mesh", spread.mesh.digest, spread.mesh.shape, tuple(repr(p) for p in spread.placements))
    if isinstance(spread, HeldSpread):
        return ("held", spread.holder)
    return spread if spread is None or isinstance(spread, str) else repr(spread)


class SpreadOf:
    """The spreads of one save's tensors, with the meshes they share built once."""

    def __init__(self, group_ranks: dict[int, int] | None, world_size: int) -> None:
        self.group_ranks = group_ranks
        self.world_size = world_size
        self._meshes: dict[int, Mesh | None] = {}

    def _mesh(self, device_mesh) -> Mesh | None:
        key = id(device_mesh)
        if key not in self._meshes:
            ranks = tuple(int(r) for r in device_mesh.mesh.flatten().tolist())
            if self.group_ranks is not None:
                ranks = tuple(self.group_ranks.get(r, -1) for r in ranks)
            mesh = None if any(r < 0 for r in ranks) else Mesh(ranks, tuple(int(s) for s in device_mesh.shape))
            self._meshes[key] = mesh
        return self._meshes[key]

    def __call__(self, t) -> Spread | str | None:
        """``t``'s spread as far as this rank can tell alone: a :class:`Spread`, ``"whole"`` (a
        replica on every rank: the planner picks its writer), or None (to be exchanged)."""
        if isinstance(t, StagedPart):
            return t.spread
        if not is_dtensor(t):
            return "whole"
        placements = tuple(t.placements)
        simple = all(type(p) is Shard or type(p) is Replicate for p in placements)
        if not simple or _compute_local_shape_and_global_offset is None:
            return None
        device_mesh, placements = _on_root_mesh(t.device_mesh, placements)
        if device_mesh is None:
            return None
        mesh = self._mesh(device_mesh)
        if mesh is None:
            return None
        if not any(isinstance(p, Shard) for p in placements) and len(mesh.ranks) == self.world_size:
            return "whole"
        return MeshSpread(tuple(int(d) for d in t.shape), mesh, placements)


def _on_root_mesh(device_mesh, placements: tuple) -> tuple:
    """The same layout on the mesh every rank shares. FSDP2 over the ``dp`` dimension of a
    ``(dp, tp)`` mesh puts each parameter on one ``dp`` column of it, a different sub-mesh on
    each column; on the root mesh it is the same placements plus ``Replicate`` on the other
    dimensions, the same on every rank. ``(None, None)`` when the sub-mesh cannot be placed on
    its root (flattened dimensions): its boxes are then exchanged."""
    try:
        root = device_mesh._get_root_mesh()
    except AttributeError:  # pragma: no cover (older torch)
        return device_mesh, placements
    if root is None or root is device_mesh:
        return device_mesh, placements
    names, root_names = device_mesh.mesh_dim_names, root.mesh_dim_names
    if not names or not root_names or not all(n in root_names for n in names):
        return None, None
    on_root = [Replicate()] * root.ndim
    for i, name in enumerate(names):
        on_root[root_names.index(name)] = placements[i]
    return root, tuple(on_root)
