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
    Partial,
    Replicate,
    ShardingSpec,
)

__all__ = ["Layout", "RedistributePlan", "layout_of"]

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_replicate", isinstance(self.spec, Replicate))
        object.__setattr__(self, "is_partial", isinstance(self.spec, Partial))
        object.__setattr__(self, "is_sharded",
                           isinstance(self.spec, ChunkShardingSpec | EnumerableShardingSpec))

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


@dataclass(frozen=True)
class RedistributePlan:
    """What one rank does to move its blocks from ``src`` to ``dst`` (see NOTE above).

    ``local`` pieces: (src local position, src box, dst local position, dst box).
    ``send[p]`` pieces: (src local position, src box); ``recv[p]`` pieces:
    (dst local position, dst box, numel). Boxes are relative to the block.
    """

    local: tuple[tuple[int, Box, int, Box], ...]
    send: tuple[tuple[tuple[int, Box], ...], ...]  # indexed by group rank
    recv: tuple[tuple[tuple[int, Box, int], ...], ...]
    needs_communication: bool


def _bounds(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.tensor([s.shard_offsets for s in layout.shards], dtype=torch.int64)
    sizes = torch.tensor([s.shard_sizes for s in layout.shards], dtype=torch.int64)
    offsets = offsets.reshape(len(layout.shards), len(layout.size))
    return offsets, offsets + sizes.reshape(offsets.shape)


@functools.lru_cache(maxsize=1024)
def redistribute_plan(src: Layout, dst: Layout, rank: int) -> RedistributePlan:
    """The plan for global ``rank``; both layouts are sharded or replicated, same group."""
    group = src.group_ranks
    group_rank = {r: g for g, r in enumerate(group)}
    src_owner = [s.placement.rank() for s in src.shards]  # type: ignore[union-attr]
    dst_owner = [s.placement.rank() for s in dst.shards]  # type: ignore[union-attr]
    src_lo, src_hi = _bounds(src)
    dst_lo, dst_hi = _bounds(dst)
    # overlap[j, i]: dst block j intersects src block i in a non-empty box
    lo = torch.maximum(dst_lo[:, None, :], src_lo[None, :, :])
    hi = torch.minimum(dst_hi[:, None, :], src_hi[None, :, :])
    overlap = (hi > lo).all(dim=-1)
    if src.is_replicate:
        # Every rank holds all of src: take only the copy on the dst block's own rank.
        own = torch.tensor(
            [[src_owner[i] == dst_owner[j] for i in range(len(src_owner))]
             for j in range(len(dst_owner))], dtype=torch.bool,
        ).reshape(overlap.shape)
        overlap &= own
    pairs = overlap.nonzero().tolist()
    src_pos = {i: p for p, i in enumerate(src.local_indices(rank))}
    dst_pos = {j: p for p, j in enumerate(dst.local_indices(rank))}
    world = len(group)
    local: list[tuple[int, Box, int, Box]] = []
    send: list[list[tuple[int, Box]]] = [[] for _ in range(world)]
    recv: list[list[tuple[int, Box, int]]] = [[] for _ in range(world)]
    crosses = False
    for j, i in pairs:
        box_lo = lo[j, i].tolist()
        box_hi = hi[j, i].tolist()
        s_from, d_to = src_owner[i], dst_owner[j]
        if s_from != d_to:
            crosses = True
        if s_from != rank and d_to != rank:
            continue
        src_box = tuple(
            slice(a - o, b - o)
            for a, b, o in zip(box_lo, box_hi, src.shards[i].shard_offsets, strict=True)
        )
        dst_box = tuple(
            slice(a - o, b - o)
            for a, b, o in zip(box_lo, box_hi, dst.shards[j].shard_offsets, strict=True)
        )
        if s_from == rank and d_to == rank:
            local.append((src_pos[i], src_box, dst_pos[j], dst_box))
        elif s_from == rank:
            send[group_rank[d_to]].append((src_pos[i], src_box))
        else:
            numel = 1
            for a, b in zip(box_lo, box_hi, strict=True):
                numel *= b - a
            recv[group_rank[s_from]].append((dst_pos[j], dst_box, numel))
    return RedistributePlan(
        tuple(local), tuple(tuple(s) for s in send), tuple(tuple(r) for r in recv), crosses
    )
