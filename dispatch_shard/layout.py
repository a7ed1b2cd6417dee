"""Layouts: where every block of a global tensor lives, and how to move between two.

A :class:`Layout` is the dtype-independent part of a ShardedTensor's metadata:
the spec, the global size and the process group's global ranks. Layouts are
interned (built through :func:`layout_of`; NOTE [layout interning]), so
comparing two tensors' layouts is an identity check, and per-layout derived facts (which shards are
local to a rank, the plan to move data to another layout) are cached.

NOTE [redistribution plans]
Moving data from layout A to layout B is the same computation on every rank:
intersect every block of A with every block of B. A rank sends the
intersections of its A-blocks with B-blocks placed elsewhere, receives the
intersections of its B-blocks with A-blocks placed elsewhere, and copies the
rest locally. Both sides enumerate the pieces exchanged between two ranks in
one order (B-block index, then A-block index), so a flat buffer per peer needs
no headers. Whether any piece crosses ranks is decided from global metadata,
so every rank agrees on whether to issue the collective at all.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch

from dispatch_shard.metadata import ShardMetadata, TensorProperties
from dispatch_shard.specs import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    MeshShardingSpec,
    Partial,
    Replicate,
    ShardingSpec,
)

__all__ = ["Layout", "RedistributePlan", "flattened_layout", "layout_of"]

Box = tuple[slice, ...]


@dataclass(frozen=True, eq=False)
class Layout:
    """The blocks of a ``size`` tensor laid out by ``spec`` over ``group_ranks``.

    Interned by :func:`layout_of`: equal arguments give the same object while any
    holds it (NOTE [layout interning]), and layouts compare by identity.
    """

    spec: ShardingSpec
    size: torch.Size
    group_ranks: tuple[int, ...]
    device: str
    shards: tuple[ShardMetadata, ...]
    _local: dict[int, tuple[int, ...]] = field(default_factory=dict, repr=False)
    # Layouts derived from this one by ops (a transpose, a full sum's shares), keyed by
    # the op's parameters: a sharding decision made once per layout, not once per call.
    _derived: dict[object, Layout] = field(default_factory=dict, repr=False)
    # The spec's kind, as plain attributes: every op reads them (a property costs a call).
    is_replicate: bool = field(init=False, repr=False)
    is_partial: bool = field(init=False, repr=False)
    is_sharded: bool = field(init=False, repr=False)
    # An N-D layout (MeshShardingSpec): blocks with several holders, maybe a pending
    # reduction over a sub-group (NOTE [N-D layouts: blocks with several holders]).
    is_mesh: bool = field(init=False, repr=False)
    # Whether the blocks are terms of a pending reduction (Partial, or a partial mesh dim).
    pending: bool = field(init=False, repr=False)

    def __deepcopy__(self, memo: dict[int, object]) -> Layout:
        return self  # immutable and interned: a copy is the same layout

    def __post_init__(self) -> None:
        spec = self.spec
        object.__setattr__(self, "is_replicate", isinstance(spec, Replicate))
        object.__setattr__(self, "is_partial", isinstance(spec, Partial))
        object.__setattr__(self, "is_sharded",
                           isinstance(spec, ChunkShardingSpec | EnumerableShardingSpec))
        object.__setattr__(self, "is_mesh", isinstance(spec, MeshShardingSpec))
        object.__setattr__(self, "pending", isinstance(spec, Partial) or (
            isinstance(spec, MeshShardingSpec) and spec.partial_op is not None))
        if self.is_mesh:
            _mesh_layouts_made[0] = True

    @property
    def reduce_op(self) -> str | None:
        """The pending reduction (``"sum"``...), or None."""
        spec = self.spec
        if isinstance(spec, Partial):
            return spec.reduce_op
        return spec.partial_op if isinstance(spec, MeshShardingSpec) else None

    def summand_classes(self) -> tuple[int, ...]:
        """Per block: which term of the pending reduction it holds (all 0 when none is
        pending: holders of one box are copies)."""
        spec = self.spec
        if isinstance(spec, MeshShardingSpec):
            return spec.summand_classes()
        if isinstance(spec, Partial):
            return tuple(range(len(self.shards)))
        return (0,) * len(self.shards)

    def value_layout(self) -> Layout:
        """The layout of the value once its pending reduction is done: partial mesh dims
        become replicated (Partial becomes Replicate); ``self`` when nothing is pending."""
        if not self.pending:
            return self
        found = self._derived.get(("value",))
        if found is None:
            spec = self.spec
            if isinstance(spec, MeshShardingSpec):
                from dispatch_shard.specs import mesh_sharding_spec

                device = self.device or "cpu"
                spec = mesh_sharding_spec(
                    spec.mesh_shape, spec.mesh_ranks,
                    [("replicate", 0) if kind == "partial" else (kind, arg)
                     for kind, arg in spec.placements], self.size, device)
            else:
                spec = Replicate()
            found = self._derived[("value",)] = self.with_spec(spec)
        return found

    def local_indices(self, rank: int) -> tuple[int, ...]:
        """Indices into :attr:`shards` of the blocks placed on global ``rank``, in order."""
        found = self._local.get(rank)
        if found is None:
            found = tuple(i for i, s in enumerate(self.shards) if s.placement.rank() == rank)  # type: ignore[union-attr]
            self._local[rank] = found
        return found

    def shard_box(self, index: int) -> Box:
        """The slices of the global tensor that block ``index`` covers."""
        shard = self.shards[index]
        return tuple(
            slice(o, o + n) for o, n in zip(shard.shard_offsets, shard.shard_sizes, strict=True)
        )

    def with_spec(self, spec: ShardingSpec) -> Layout:
        """The layout of the same tensor laid out by ``spec`` (on this layout's device)."""
        device = self.device
        if not device and self.shards and self.shards[0].placement is not None:
            # A sharded layout names no device of its own: its placements do.
            # Without this, Replicate from a sharded layout would intern a
            # second, device-less layout beside the one creation makes.
            device = str(self.shards[0].placement.device())
        return layout_of(spec, self.size, self.group_ranks, device)

    def same_blocks(self, other: Layout) -> bool:
        """Whether ``other`` is this value with the same blocks on the same ranks (nothing
        pending in either), under another spec maybe: moving between them moves nothing.
        (On a group of one rank, a single whole block is also the replicated layout.)"""
        return self is other or (not self.pending and not other.pending
                                 and self.shards == other.shards)


# Whether any N-D layout was ever made: until one is, the dispatch loop skips the
# check for N-D operands (see dispatch_shard.holders).
_mesh_layouts_made = [False]


def layout_of(
    spec: ShardingSpec,
    size: torch.Size,
    group_ranks: tuple[int, ...],
    device: str = "cpu",
    properties: TensorProperties | None = None,
) -> Layout:
    """The interned layout; raises the spec's validation errors (bad dim, unknown rank...).

    ``device`` places :class:`Replicate` / :class:`Partial` blocks (other specs
    name their devices). ``properties`` are validated too (layout, memory
    format) but are not part of the result; pass them where a user supplied them.
    """
    if not spec._uses_device:
        device = ""
    if properties is not None and properties != _DEFAULT_PROPERTIES:
        spec.build_metadata(size, properties, group_ranks, device=device or None)
    return _interned_layout(spec, torch.Size(size), group_ranks, device)


# NOTE [layout interning]
# Equal arguments give the same Layout object for as long as anything holds that
# object: every live layout is in ``_live``, a weak-value map, so identity is exact
# however many other layouts were made in between (a cache with eviction would make
# a second object for a layout still in use, and every ``is`` fast path would then
# silently take its slow path, perhaps on some ranks only). A layout no tensor or
# cache holds any more is dropped, and made anew if asked again. The small
# ``lru_cache`` in front only saves the weak map's Python-level lookup on hot paths;
# it returns the object the map holds, so it can never give a second one.

_live: weakref.WeakValueDictionary[
    tuple[ShardingSpec, torch.Size, tuple[int, ...], str], Layout
] = weakref.WeakValueDictionary()


@functools.lru_cache(maxsize=1024)
def _interned_layout(
    spec: ShardingSpec, size: torch.Size, group_ranks: tuple[int, ...], device: str
) -> Layout:
    key = (spec, size, group_ranks, device)
    layout = _live.get(key)
    if layout is None:
        metadata = spec.build_metadata(size, _DEFAULT_PROPERTIES, group_ranks,
                                       device=device or None)
        layout = Layout(spec, metadata.size, group_ranks, device,
                        tuple(metadata.shards_metadata))
        _live[key] = layout
    return layout


_DEFAULT_PROPERTIES = TensorProperties()


def flattened_layout(layout: Layout) -> Layout:
    """``layout`` (nothing pending) with each box split among its holders: one holder
    per piece, so a 1-D sharded layout (a chunk spec where one fits) over the same ranks.

    A box is split along the first tensor dim that a mesh dim shards, or else its
    longest dim, in ``torch.chunk`` pieces, holders in mesh (or group) order.
    """
    found = layout._derived.get(("flattened",))
    if found is not None:
        return found
    from dispatch_shard.specs import _as_chunk

    spec = layout.spec
    assert not layout.pending and layout.size
    sharded = [int(arg) % len(layout.size) for kind, arg in spec.placements
               if kind == "shard"] if isinstance(spec, MeshShardingSpec) else []
    boxes: dict[tuple[tuple[int, ...], tuple[int, ...]], list[ShardMetadata]] = {}
    for shard in layout.shards:
        boxes.setdefault((tuple(shard.shard_offsets), tuple(shard.shard_sizes)), []).append(shard)
    pieces = []
    for (offsets, sizes), holders in boxes.items():
        dim = sharded[0] if sharded else max(range(len(sizes)), key=lambda d: sizes[d])
        step = -(-sizes[dim] // len(holders)) if sizes[dim] else 0
        for index, holder in enumerate(holders):
            lows, lengths = list(offsets), list(sizes)
            start = min(index * step, sizes[dim])
            lows[dim] = offsets[dim] + start
            lengths[dim] = min(step, sizes[dim] - start)
            pieces.append(ShardMetadata(lows, lengths, holder.placement))
    flat = _as_chunk(pieces, layout.size, layout.device or "cpu")
    found = layout._derived[("flattened",)] = layout.with_spec(flat)
    return found


@dataclass(frozen=True)
class RedistributePlan:
    """What one rank does to move its blocks from ``src`` to ``dst`` (see NOTE above).

    ``send[p]``: the pieces for group rank ``p``, in order: (src local position, src
    box). ``recv[p]``: how many elements come from ``p``. ``steps``: how each piece of
    this rank's ``dst`` blocks is filled, in order, after the exchange: (dst local
    position, dst box, src local position or -1 for a received piece, src box or the
    received piece's element offset in the receive buffer, whether to add it to what
    the step before wrote there: the terms of a pending sum, in one order on every
    holder, so copies stay bitwise equal). Boxes are relative to the block.
    ``peers``: where every piece that crosses ranks moves between ranks that differ
    along one mesh dim only, the sub-groups along that dim (global ranks, sorted), on
    which the exchange runs; else None (the whole group).
    """

    send: tuple[tuple[tuple[int, Box], ...], ...]  # indexed by group rank
    recv: tuple[int, ...]
    steps: tuple[tuple[int, Box, int, Box | int, bool], ...]
    needs_communication: bool
    peers: tuple[tuple[int, ...], ...] | None = None


def _bounds(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([s.shard_offsets for s in layout.shards], dtype=torch.int64)
    sizes = torch.tensor([s.shard_sizes for s in layout.shards], dtype=torch.int64)
    offsets = offsets.reshape(len(layout.shards), len(layout.size))
    return offsets, offsets + sizes.reshape(offsets.shape)


def _regions(layout: Layout) -> list[list[list[int]]]:
    """The distinct boxes of ``layout``: for each, its holders' block indices grouped by
    the term of the pending reduction they hold (one group when nothing is pending)."""
    classes = layout.summand_classes()
    found: dict[tuple[tuple[int, ...], tuple[int, ...]], dict[int, list[int]]] = {}
    for i, shard in enumerate(layout.shards):
        key = (tuple(shard.shard_offsets), tuple(shard.shard_sizes))
        found.setdefault(key, {}).setdefault(classes[i], []).append(i)
    return [[terms[c] for c in sorted(terms)] for terms in found.values()]


def _mesh_coordinates(layout: Layout) -> dict[int, tuple[int, ...]] | None:
    """Each rank's position on the mesh of an N-D layout; None for a 1-D one."""
    spec = layout.spec
    if not isinstance(spec, MeshShardingSpec):
        return None
    return dict(zip(spec.mesh_ranks, spec.coordinates(), strict=True))


@functools.lru_cache(maxsize=1024)
def redistribute_plan(src: Layout, dst: Layout, rank: int) -> RedistributePlan:
    """The plan for global ``rank``; ``dst`` holds no pending reduction; same group.

    (Plans are found with tensors of block bounds: while torch.compile traces an op,
    its fake-tensor modes are set aside for that, so a plan is plain metadata.)"""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return _plan(src, dst, rank)


def _plan(src: Layout, dst: Layout, rank: int) -> RedistributePlan:
    """The plan for global ``rank``; ``dst`` holds no pending reduction; same group.

    Each piece of a ``dst`` block comes from one holder of each term of ``src``'s value
    there: the ``dst`` block's own rank where it holds one (no data moves), else a
    holder picked by the receiving rank's number, so that copies share the sending.
    """
    group = src.group_ranks
    group_rank = {r: g for g, r in enumerate(group)}
    src_owner = [s.placement.rank() for s in src.shards]  # type: ignore[union-attr]
    dst_owner = [s.placement.rank() for s in dst.shards]  # type: ignore[union-attr]
    regions = _regions(src)
    coordinates = _mesh_coordinates(src) or _mesh_coordinates(dst)
    src_lo, src_hi = _bounds(src)
    first = torch.tensor([region[0][0] for region in regions], dtype=torch.int64)
    reg_lo, reg_hi = src_lo[first], src_hi[first]
    dst_lo, dst_hi = _bounds(dst)
    # Every (dst block j, src region k) that intersect in a non-empty box, with the box:
    # in slices of dst blocks, so that the work arrays stay small on a large mesh.
    # Where every region has one holder (no copies, nothing pending), only the pairs this
    # rank sends or receives are kept (whether any piece crosses ranks is found on the
    # arrays): a redistribution between two layouts of a large mesh has up to one pair
    # per (block, block), which Python need not see.
    single = all(len(region) == 1 and len(region[0]) == 1 for region in regions)
    region_owner = torch.tensor([src_owner[region[0][0]] for region in regions])
    dst_owner_t = torch.tensor(dst_owner)
    pairs: list[tuple[int, int, list[int], list[int]]] = []
    crosses = False
    # The mesh dims along which crossing pieces move (any pair apart along several: -1).
    axes: set[int] = set()
    position = None
    if coordinates is not None:  # row r: global rank r's mesh coordinates
        ndim = len(next(iter(coordinates.values())))
        position = torch.tensor([coordinates.get(r, (-1,) * ndim)
                                 for r in range(max(coordinates) + 1)], dtype=torch.int64)
    step = max(1, (1 << 16) // max(1, len(regions)))
    for first_j in range(0, len(dst.shards), step):
        lo = torch.maximum(dst_lo[first_j:first_j + step, None, :], reg_lo[None, :, :])
        hi = torch.minimum(dst_hi[first_j:first_j + step, None, :], reg_hi[None, :, :])
        found = (hi > lo).all(dim=-1).nonzero()
        if single and len(found):
            to, by = dst_owner_t[first_j + found[:, 0]], region_owner[found[:, 1]]
            crossing = to != by
            crosses = crosses or bool(crossing.any())
            if position is not None and bool(crossing.any()):
                apart = position[to[crossing]] != position[by[crossing]]
                if bool((apart.sum(1) > 1).any()):
                    axes.add(-1)
                axes.update(apart.any(0).nonzero().flatten().tolist())
            found = found[(to == rank) | (by == rank)]
        pairs += [(first_j + j, k, a, b) for (j, k), a, b in zip(
            found.tolist(), lo[found[:, 0], found[:, 1]].tolist(),
            hi[found[:, 0], found[:, 1]].tolist(), strict=True)]
    src_pos = {i: p for p, i in enumerate(src.local_indices(rank))}
    dst_pos = {j: p for p, j in enumerate(dst.local_indices(rank))}
    world = len(group)
    send: list[list[tuple[int, Box]]] = [[] for _ in range(world)]
    received: list[list[tuple[int, Box, int, bool]]] = [[] for _ in range(world)]
    steps: list[tuple[int, Box, int, Box | int, bool] | tuple[int, Box, int, int, bool]] = []
    for j, k, box_lo, box_hi in pairs:
        d_to = dst_owner[j]
        dst_box = tuple(
            slice(a - o, b - o)
            for a, b, o in zip(box_lo, box_hi, dst.shards[j].shard_offsets, strict=True)
        )
        for term, holders in enumerate(regions[k]):
            owners = [src_owner[i] for i in holders]
            if d_to in owners:
                i = holders[owners.index(d_to)]
            elif coordinates is not None:
                # The holder nearest on the mesh: the fewest mesh coordinates apart (a
                # peer along one mesh dim), so that the traffic stays in sub-groups.
                i = min(holders, key=lambda h: sum(
                    a != b for a, b in zip(coordinates[src_owner[h]], coordinates[d_to],
                                           strict=True)))
            else:
                i = holders[group_rank[d_to] % len(holders)]
            s_from = src_owner[i]
            if s_from != d_to:
                crosses = True
                if coordinates is not None and not single:
                    apart_dims = [m for m, (a, b) in enumerate(zip(
                        coordinates[s_from], coordinates[d_to], strict=True)) if a != b]
                    axes.update(apart_dims if len(apart_dims) == 1 else [-1])
            if s_from != rank and d_to != rank:
                continue
            src_box = tuple(
                slice(a - o, b - o)
                for a, b, o in zip(box_lo, box_hi, src.shards[i].shard_offsets, strict=True)
            )
            add = term > 0
            if s_from == rank and d_to == rank:
                steps.append((dst_pos[j], dst_box, src_pos[i], src_box, add))
            elif s_from == rank:
                send[group_rank[d_to]].append((src_pos[i], src_box))
            else:
                numel = 1
                for a, b in zip(box_lo, box_hi, strict=True):
                    numel *= b - a
                peer = received[group_rank[s_from]]
                peer.append((dst_pos[j], dst_box, numel, add))
                steps.append((dst_pos[j], dst_box, -1 - group_rank[s_from], len(peer) - 1, add))
    # Received pieces sit in the buffer peer by peer, each peer's in the order sent.
    start = [0] * world
    for p in range(1, world):
        start[p] = start[p - 1] + sum(n for _, _, n, _ in received[p - 1])
    offsets = [[start[p] + sum(n for _, _, n, _ in received[p][:q])
                for q in range(len(received[p]))] for p in range(world)]
    resolved = tuple(
        (pos, box, -1, offsets[-1 - source][index], add) if source < 0  # type: ignore[index]
        else (pos, box, source, index, add)
        for pos, box, source, index, add in steps
    )
    peers = None
    if coordinates is not None and len(axes) == 1 and -1 not in axes and \
            sorted(coordinates) == sorted(group) and list(group) == sorted(group):
        (axis,) = axes
        lines: dict[tuple[int, ...], list[int]] = {}
        for r in sorted(coordinates):
            key = tuple(c for m, c in enumerate(coordinates[r]) if m != axis)
            lines.setdefault(key, []).append(r)
        peers = tuple(sorted(tuple(line) for line in lines.values()))
    return RedistributePlan(
        tuple(tuple(s) for s in send),
        tuple(sum(n for _, _, n, _ in r) for r in received),
        resolved,
        crosses,
        peers,
    )
