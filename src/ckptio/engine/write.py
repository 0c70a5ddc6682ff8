"""Writing a ``{name: tensor}`` state into files, from every rank of a group at once.

The one write path of ckptio, whatever the world size: one process is a world of one, and
the tensors may be plain (replicas: one process, DDP), DTensors of any layout (FSDP2, tensor
parallel), staged host copies of an async save (:class:`~ckptio.engine.tensors.StagedPart`)
or tensors read on demand from another checkpoint (:class:`~ckptio.engine.tensors.Deferred`).

1. *describe*: every rank reports its keys, full shapes and the box it holds (one gather;
   ranks that disagree about keys fail together).
2. *plan*: :func:`~ckptio.engine.plan.plan_files` (pure, same everywhere): the same files
   from any number of ranks, each file given an owner.
3. *write*: on several ranks, safetensors files on a filesystem are filled in place, each
   rank writing its own pieces at their offsets (:mod:`ckptio.engine.inplace`: ``Shard(0)``
   boxes and replicas never cross the network). Otherwise (one process, ``torch.save`` files,
   object stores) round by round (the i-th file of every owner), each tensor is collected on
   its file's owner (point to point, only for sharded DTensors) and the owner hands the file
   to a writer thread, so writing one file overlaps collecting the next; a rank holds at most
   ``WRITE_THREADS`` files of full tensors.
Every step is collective: a failure on any rank is raised on all ranks after the loop.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ckptio.engine.gather import gather_full
from ckptio.engine.group import Group, collective_step, report_errors
from ckptio.engine.inplace import write_in_place
from ckptio.engine.plan import FilePlan, plan_files, replica_writers
from ckptio.engine.spread import AmongSpread, ExchangedSpread, Spread, SpreadOf, WholeSpread
from ckptio.engine.spread import describe as describe_spread
from ckptio.engine.tensors import Deferred, Region, is_dtensor, local_region, refuse_meta, without_partial
from ckptio.errors import CheckpointError
from ckptio.formats import extra_state as extra_state_format
from ckptio.formats import safetensors_format, torch_format
from ckptio.storage.base import FileRecord, FileWriter

# Files one rank writes at once (measured: 2 beats 1 on the 2-core reference machine: file
# writes and hashing release the GIL, and a second file in flight keeps the disk busy while
# the other is filling the page cache).
WRITE_THREADS = 2
# Several ranks writing safetensors on a filesystem fill the files in place (engine/inplace.py);
# False collects every file on its owner instead (kept for the benchmark's ablation).
IN_PLACE = True
SAFETENSORS_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class WriteSpec:
    """The files a write produces: ``weights_name`` shards (or one file when ``shard`` is
    False) of at most ``max_shard_bytes``, safetensors or ``torch.save`` format. An empty
    state gives one empty file when ``empty_file``, else none."""

    weights_name: str
    max_shard_bytes: int
    shard: bool = True
    use_safetensors: bool = True
    empty_file: bool = True
    #: modules' extra state that is not a tensor, as :func:`ckptio.formats.extra_state.to_text`:
    #: written into a one-file save (a sharded one keeps it in its index)
    extra_state: str | None = None
    #: more ``__metadata__`` entries of a one-file safetensors save (a sharded one keeps them in its index)
    file_metadata: tuple[tuple[str, str], ...] = ()

    def one_file_metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of a one-file safetensors save."""
        metadata = {**SAFETENSORS_METADATA, **dict(self.file_metadata)}
        if self.extra_state is not None:
            metadata[extra_state_format.METADATA_KEY] = self.extra_state
        return metadata


@dataclass(frozen=True)
class Described:
    """What every rank knows about a state to save, with no rank's details gathered: keys,
    dtypes and full shapes (the same everywhere, checked through one digest) and, per key,
    how the ranks hold it (:mod:`ckptio.engine.spread`). ``static``: the keys of every rank
    that do not change between saves."""

    keys: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]
    spreads: dict[str, Spread]
    digest: str
    static: frozenset[str] = frozenset()


def _signature(state: dict, spread_of: SpreadOf, static: Collection[str]) -> tuple[list, dict]:
    keys, local = [], {}
    for k, t in state.items():
        local[k] = spread_of(t)
        keys.append((k, str(t.dtype), tuple(int(d) for d in t.shape), describe_spread(local[k]), k in static))
    return keys, local


def describe(state: dict, group: Group, static: Collection[str] = (), *, keys_differ: bool = False) -> Described:
    """Collective. Every rank exchanges one digest of its keys, shapes and layouts (O(ranks),
    not ranks x tensors); only tensors whose boxes cannot be worked out locally (strided
    layouts) have their boxes gathered. Ranks that disagree fail together, naming the keys.

    ``keys_differ``: ranks may hold different keys (pipeline stages, expert shards). Ranks that
    hold the same keys send one digest alike, so the keys travel once per distinct digest (once
    per stage, not per rank); the state saved is their union, in the order of the first rank
    holding each key (stage order: the full model's), each key held by the ranks that sent it."""
    refuse_meta(state)
    spread_of = SpreadOf(group.rank_of_global(), group.size)
    keys, local = _signature(state, spread_of, static)
    if not group.active:
        _check_world_of_one(state, local)
    digest = hashlib.sha1(repr(keys).encode()).hexdigest()
    digests = collective_step(group, "describing the state to save", lambda: digest, gather=True)
    holders: dict[str, frozenset[int]] = {}
    if len(set(digests)) > 1:
        if not keys_differ:
            _raise_disagreement(group, keys, digests)
        keys, local, holders = _union(group, keys, local, digests)
        digest = hashlib.sha1(repr(digests).encode()).hexdigest()
    exchange = [k for k, _, _, spread, _ in keys if spread is None]
    regions = {}
    if exchange:  # the same on every rank: from the digests or the union
        mine = {k: local_region(state[k]) for k in exchange if k in state}
        gathered = collective_step(group, "exchanging the boxes of strided layouts", lambda: mine, gather=True)
        regions = {k: [g.get(k) for g in gathered] for k in exchange}  # None: a rank without the key
    whole = [(k, torch.Size(shape).numel() * _dtype(dt).itemsize) for k, dt, shape, s, _ in keys if s == "whole"]
    writers = replica_writers(whole, group.size, holders)
    spreads: dict[str, Spread] = {}
    for k, _, shape, *_ in keys:
        spread = local[k]
        among = holders.get(k)
        if spread == "whole":
            spreads[k] = WholeSpread(shape, writers[k], among)
            continue
        if spread is None:
            nothing = Region((0,) * len(shape), (0,) * len(shape))
            spread = ExchangedSpread(shape, tuple(r if r is not None else nothing for r in regions[k]))
        spreads[k] = AmongSpread(spread, among) if among is not None else spread
    static_keys = frozenset(k for k, *_, is_static in keys if is_static)
    return Described(tuple((k, _dtype(dt), shape) for k, dt, shape, *_ in keys), spreads, digest, static_keys)


def _union(group: Group, keys: list, local: dict, digests: list[str]) -> tuple[list, dict, dict]:
    """Every rank's keys, sent once per distinct digest: the union's signature (first holder's
    order), every key's spread (a non-holder rebuilds it from the sender's), and its holders."""
    first: dict[str, int] = {}
    for rank, d in enumerate(digests):
        first.setdefault(d, rank)
    sender = first[digests[group.rank]] == group.rank
    payload = [(entry, local[entry[0]]) for entry in keys] if sender else None
    sent = collective_step(group, "exchanging the keys each rank holds", lambda: payload, gather=True)
    merged: dict[str, tuple] = {}
    spreads: dict[str, Spread | str | None] = {}
    holders: dict[str, frozenset[int]] = {}
    for d, rank in first.items():
        ranks = frozenset(r for r, other in enumerate(digests) if other == d)
        for entry, spread in sent[rank]:
            key = entry[0]
            if key not in merged:
                merged[key], spreads[key], holders[key] = entry, local.get(key, spread), ranks
                continue
            if merged[key] != entry or entry[3] != "whole":
                raise CheckpointError(
                    f"{key} is held by ranks {sorted(holders[key])[:8]} and {sorted(ranks)[:8]} in different dtypes, "
                    "shapes or layouts; a key several groups of ranks hold must be the same plain tensor on all"
                )
            holders[key] |= ranks
    everyone = frozenset(range(group.size))
    holders = {k: v for k, v in holders.items() if v != everyone}
    return list(merged.values()), spreads, holders


def _check_world_of_one(state: dict, local: dict) -> None:
    """A world of one must hold every tensor whole: a DTensor sharded over other ranks cannot be
    collected without them (save it through its plugin, on every rank)."""
    for key, t in state.items():
        if is_dtensor(t) and local[key] != "whole" and t.device_mesh.size() > 1:
            region = local_region(t)
            if not region.box or region.shape != tuple(t.shape):
                raise CheckpointError(
                    f"{key} is a DTensor sharded over {t.device_mesh.size()} ranks, but this save runs on this "
                    "process alone; save through the plugin's Booster, called on every rank"
                )


def _raise_disagreement(group: Group, keys: list, digests: list[str]) -> None:
    """Ranks passed different states: gather the keys (only now) to say which differ."""
    described = collective_step(group, "comparing the states the ranks passed", lambda: keys, gather=True)
    first = {k[0]: k for k in described[0]}
    for rank, theirs_list in enumerate(described[1:], start=1):
        theirs = {k[0]: k for k in theirs_list}
        diff = sorted(k for k in first.keys() | theirs.keys() if first.get(k) != theirs.get(k))
        if diff:
            raise CheckpointError(
                f"ranks disagree on the state to save: rank 0 and rank {rank} differ on {diff[:5]} "
                "(every rank must pass the same model / optimizer)"
            )
    raise CheckpointError("ranks disagree on the state to save (their descriptions differ)")


def _dtype(name) -> torch.dtype:
    return name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."))


_PLANS: collections.OrderedDict = collections.OrderedDict()
_PLAN_CACHE_SIZE = 8


def _plan(keys, spec: WriteSpec, world_size: int, digest: str | None = None, static: Collection[str] = ()) -> FilePlan:
    """The file plan, reused across saves of the same structure (a training loop saves the
    same model and optimizer again and again; ``digest`` covers which keys are static)."""
    cache_key = (digest, spec, world_size) if digest is not None else None
    if cache_key is not None and cache_key in _PLANS:
        _PLANS.move_to_end(cache_key)
        return _PLANS[cache_key]
    sizes = [(k, torch.Size(shape).numel() * _dtype(dt).itemsize) for k, dt, shape, *_ in keys]
    plan = plan_files(
        sizes,
        world_size,
        weights_name=spec.weights_name,
        max_shard_bytes=spec.max_shard_bytes,
        shard=spec.shard,
        empty_file=spec.empty_file,
        static=static,
    )
    if cache_key is not None:
        _PLANS[cache_key] = plan
        while len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    return plan


def replica_writer_of_each_key(state: dict, group: Group) -> dict[str, int]:
    """The rank that writes each whole replica of ``state`` (plain tensors, DTensors replicated
    over the whole group), as :func:`describe` decides it: computed locally, so an async save
    can stage on each rank only the replicas it writes. Any other rank that needs one (the
    owner of a ``torch.save`` file) receives it from that rank."""
    spread_of = SpreadOf(group.rank_of_global(), group.size)
    whole = [(k, t.numel() * t.element_size()) for k, t in state.items() if spread_of(t) == "whole"]
    return replica_writers(whole, group.size)


def write_state(
    state: dict,
    writer: FileWriter,
    spec: WriteSpec,
    group: Group,
    *,
    subdir: str = "",
    file_name: str | None = None,
    static: Collection[str] = (),
    keys_differ: bool = False,
) -> tuple[FilePlan, list[FileRecord]]:
    """Describe, plan and write ``state`` into a staging ``writer`` that every rank shares.

    Collective; returns the plan (the same on every rank) and the records of the files this
    rank wrote. Any rank's failure is raised on every rank, after all of them finished the
    loop of collectives. ``file_name`` replaces the name of a one-file save (``spec.shard``
    False), e.g. the staging name of a single-file commit. ``static``: keys that do not change
    between saves (frozen parameters), planned into shards of their own (every rank must pass
    the same; the ranks' agreement is checked with the keys). A file of static tensors whose
    bytes a checkpoint the writer may reuse already holds is linked from it
    (:attr:`FileWriter.reuse`), not written; the content decides, the hint only says which
    files are worth hashing first: the others hold trained tensors or optimizer state, which
    every optimizer step changes, so they are written without that extra pass.
    ``keys_differ``: the ranks may hold different keys (see :func:`describe`); each key is
    written from the ranks that hold it, into the files the union of the keys gives.
    """
    state = {k: without_partial(v) for k, v in state.items()}
    described = describe(state, group, frozenset(k for k in static if k in state), keys_differ=keys_differ)
    static = described.static
    plan = _plan(described.keys, spec, group.size, described.digest, static)
    prefix = f"{subdir}/" if subdir else ""
    replicas_only = all(isinstance(s, WholeSpread) for s in described.spreads.values())
    if IN_PLACE and spec.use_safetensors and group.active and writer.positional and not replicas_only:
        # several ranks, safetensors on a filesystem, some tensors sharded: each rank writes its own
        # pieces in place, so no shard crosses the network. (Live replicas only, as under DDP: each
        # file's owner holds all its tensors already and writes it whole, hashing as it goes.)
        names = [file_name if file_name is not None else prefix + name for name, _ in plan.files]
        meta = {k: (dt, shape) for k, dt, shape in described.keys}
        metadata = spec.one_file_metadata() if not plan.sharded else SAFETENSORS_METADATA
        records = write_in_place(state, plan, meta, described.spreads, writer, group, names, metadata, static)
    else:
        dtypes = {k: dt for k, dt, _ in described.keys}
        records, error = _write_files(
            state, plan, described.spreads, writer, spec, group, prefix, file_name, static, dtypes
        )  # fmt: skip
        report_errors(group, f"writing {spec.weights_name} files", error)
    return plan, [dataclasses.replace(r, holds_tensors=True) for r in records]


def _rounds(plan: FilePlan, world: int) -> list[list[int]]:
    """File indices in rounds: round ``i`` holds the ``i``-th file of every owner, so all
    owners write at the same time instead of one after the other."""
    per_owner = [plan.files_of(r) for r in range(world)]
    depth = max((len(files) for files in per_owner), default=0)
    return [[files[i] for files in per_owner if i < len(files)] for i in range(depth)]


def _write_files(
    state, plan: FilePlan, spreads, writer, spec: WriteSpec, group: Group, prefix, file_name, static, dtypes
):  # fmt: skip
    """The write loop: collect this round's files on their owners, then every owner hands its
    file to a writer thread. A local failure stops this rank's writing but not its part in the
    collectives; the error is reported after the loop."""
    rank = group.rank
    extra = spec.extra_state if not plan.sharded else None
    metadata = dict(spec.file_metadata) if not plan.sharded else None
    records: list[FileRecord] = []
    error: BaseException | None = None
    threads = min(WRITE_THREADS, len(plan.files_of(rank)))
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckptio-write") if threads > 1 else None
    pending: collections.deque[Future] = collections.deque()

    def settle(limit: int) -> None:
        """Wait until at most ``limit`` writes are in flight, keeping their records or first error."""
        nonlocal error
        while len(pending) > limit:
            future = pending.popleft()
            try:
                records.append(future.result())
            except Exception as exc:  # noqa: BLE001 (reported to every rank after the loop)
                error = error or exc

    try:
        for round_files in _rounds(plan, group.size):
            owns_one = any(plan.owners[i] == rank for i in round_files)
            if owns_one:
                settle(threads - 1)  # at most WRITE_THREADS files of full tensors held at once
            mine: tuple[str, list] | None = None
            for index in round_files:
                (name, keys), owner = plan.files[index], plan.owners[index]
                tensors = []
                for key in keys:
                    full = gather_full(state.get(key), spreads[key], owner, group, dtypes[key])
                    if full is not None:
                        tensors.append((key, full))
                if owner == rank:
                    mine = (file_name if file_name is not None else prefix + name, tensors, set(keys) <= static)
            if mine is None or error is not None:
                continue
            name, tensors, reusable = mine
            write = functools.partial(
                write_weights_file, writer, name, tensors, spec.use_safetensors,
                extra_state=extra, metadata=metadata, reuse=reusable,
            )  # fmt: skip
            if pool is None:
                try:
                    records.append(write())
                except Exception as exc:  # noqa: BLE001 (reported to every rank after the loop)
                    error = exc
            else:
                pending.append(pool.submit(write))
            del mine, tensors, write
        settle(0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return records, error


def _materialized(tensor) -> torch.Tensor:
    full = tensor.load() if isinstance(tensor, Deferred) else tensor
    return full if full.device.type == "cpu" and full.is_contiguous() else full.detach().cpu().contiguous()


def _safetensors_chunks(items: list[tuple[str, object]], header: bytes) -> Iterator[memoryview | bytes]:
    """Header first (from dtypes and shapes alone), then each tensor's bytes; a deferred
    tensor is read just before its bytes are written (piece by piece when it can be) and
    released right after."""
    yield header
    for _, tensor in items:
        pieces = tensor.pieces() if isinstance(tensor, Deferred) and tensor.pieces is not None else None
        for piece in pieces if pieces is not None else (_materialized(tensor),):
            view = safetensors_format.tensor_bytes(piece)
            del piece
            if len(view):
                yield view
            del view


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.save`` writes a tensor's whole storage: a view of a larger buffer is copied
    first, so the file holds only the tensor's bytes, whatever memory it came from."""
    t = _materialized(tensor)
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def write_weights_file(
    writer: FileWriter,
    name: str,
    items: list[tuple[str, object]],
    use_safetensors: bool,
    *,
    extra_state: str | None = None,
    metadata: dict[str, str] | None = None,
    reuse: bool = False,
):
    """One weights file from ``(key, tensor)`` pairs (CPU or not, possibly :class:`Deferred`),
    with modules' non-tensor ``extra_state`` where the format keeps it and, in a safetensors
    file, ``metadata`` entries. With ``reuse`` (a file of static tensors), a safetensors file
    whose bytes a checkpoint the writer may reuse already holds is linked from it
    (:meth:`FileWriter.write_or_link`)."""
    if use_safetensors:
        header_metadata = {**SAFETENSORS_METADATA, **(metadata or {})}
        if extra_state is not None:
            header_metadata[extra_state_format.METADATA_KEY] = extra_state
        entries = [(k, t.dtype, tuple(t.shape)) for k, t in items]
        header = safetensors_format.build_header(entries, header_metadata)
        size = len(header) + sum(math.prod(shape) * dt.itemsize for _, dt, shape in entries)
        if not reuse:
            return writer.write(name, _safetensors_chunks(items, header))
        return writer.write_or_link(name, size, lambda: _safetensors_chunks(items, header))
    tensors: dict[str, object] = {k: _compact(t) for k, t in items}  # torch.save needs every tensor at once
    if extra_state is not None:
        tensors.update(extra_state_format.from_text(extra_state, path=name))
    with writer.open_stream(name) as stream:
        torch_format.save(tensors, stream)
    return stream.record
