"""Layout derivations shared by the op families: pure functions ``Layout -> Layout``.

Each takes a layout (and an op's parameters) and returns the layout of the result,
cached where ops call it per call: a view or slice of a layout, its blocks along
leading dims, the layout after a reduction. No tensor and no collective here: the
families decide which collectives a change of layout costs (see each family's
docstring).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dispatch_shard.layout import Layout, layout_of
from dispatch_shard.metadata import ShardMetadata
from dispatch_shard.specs import ChunkShardingSpec, EnumerableShardingSpec

__all__ = [
    "BlockMap", "chunk_dim_of", "derived_layout", "leading_boxes", "like_leading",
    "reduced_layout", "relayout", "resized_layout", "sliced_layout", "split_dims",
]


BlockMap = Callable[[list[int], list[int]], tuple[list[int], list[int]]]


def relayout(layout: Layout, size: Sequence[int], chunk_dim: int | None,
             block_map: BlockMap) -> Layout:
    """``layout`` seen through a view to ``size``: chunk specs move to ``chunk_dim`` (None:
    not expressible as a chunk spec), other blocks go through ``block_map``."""
    spec = layout.spec
    size = torch.Size(size)
    if not layout.is_sharded:
        return layout_of(spec, size, layout.group_ranks, layout.device)
    if isinstance(spec, ChunkShardingSpec) and chunk_dim is not None:
        return layout_of(ChunkShardingSpec(chunk_dim, spec.placements), size,
                         layout.group_ranks)
    blocks = []
    for shard in layout.shards:
        offsets, sizes = block_map(list(shard.shard_offsets), list(shard.shard_sizes))
        blocks.append(ShardMetadata(offsets, sizes, shard.placement))
    return layout_of(EnumerableShardingSpec(blocks), size, layout.group_ranks)


def split_dims(layout: Layout) -> frozenset[int]:
    """Dims along which some block covers less than the whole dim."""
    if not layout.is_sharded:
        return frozenset()
    return frozenset(
        d for d, n in enumerate(layout.size)
        if any(s.shard_sizes[d] != n and 0 not in s.shard_sizes for s in layout.shards)
    )


def leading_boxes(layout: Layout, lead: int) -> tuple[Any, ...]:
    """Every block's extent along the first ``lead`` dims, and its placement."""
    return tuple((tuple(s.shard_offsets[:lead]), tuple(s.shard_sizes[:lead]), s.placement)
                 for s in layout.shards)


@functools.lru_cache(maxsize=256)
def like_leading(layout: Layout, lead: int, size: torch.Size) -> Layout:
    """``layout``'s blocks along its ``lead`` leading dims, whole along the rest of
    ``size`` (whose leading dims are ``layout``'s)."""
    spec = layout.spec
    chunk_dim = spec.dim % len(layout.size) if isinstance(spec, ChunkShardingSpec) else None
    if chunk_dim is not None and chunk_dim >= lead:
        chunk_dim = None

    def block_map(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        new_sizes = list(sizes[:lead]) + list(size[lead:])
        if 0 in sizes[:lead] and 0 not in new_sizes and new_sizes:
            new_sizes[0] = 0
        return list(offsets[:lead]) + [0] * (len(size) - lead), new_sizes

    return relayout(layout, size, chunk_dim, block_map)


@functools.lru_cache(maxsize=1024)
def sliced_layout(layout: Layout, dim: int, start: int, stop: int) -> Layout:
    """Blocks of ``x[..., start:stop, ...]`` (step 1) along ``dim``: clipped and shifted."""
    size = list(layout.size)
    size[dim] = stop - start

    def block_map(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        lo = min(max(offsets[dim], start), stop)
        hi = max(min(offsets[dim] + sizes[dim], stop), lo)
        offsets, sizes = list(offsets), list(sizes)
        offsets[dim], sizes[dim] = lo - start, hi - lo
        return offsets, sizes

    return relayout(layout, size, None, block_map)


@functools.lru_cache(maxsize=1024)
def resized_layout(layout: Layout, dim: int, length: int) -> Layout:
    """``layout`` with the unsplit ``dim`` now of ``length`` (blocks that span it still do)."""
    size = [length if d == dim else n for d, n in enumerate(layout.size)]
    chunk_dim = layout.spec.dim % len(layout.size) \
        if isinstance(layout.spec, ChunkShardingSpec) else None

    def block_map(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        # A block spans the unsplit dim (offset 0) or is empty along it (any offset up to
        # the old length): the spanning ones take the new length, the empty ones stay
        # empty, at an offset inside the new length.
        return ([min(o, length) if d == dim else o for d, o in enumerate(offsets)],
                [length if d == dim and n else n for d, n in enumerate(sizes)])

    return relayout(layout, size, chunk_dim, block_map)


@functools.lru_cache(maxsize=1024)
def reduced_layout(layout: Layout, dims: tuple[int, ...], keepdim: bool) -> Layout:
    """``layout`` after reducing ``dims``, which no block splits (size 1 with ``keepdim``)."""
    ndim = len(layout.size)
    keep = [d for d in range(ndim) if keepdim or d not in dims]
    size = [1 if d in dims else layout.size[d] for d in keep]
    spec = layout.spec
    chunk_dim = None
    if isinstance(spec, ChunkShardingSpec) and spec.dim % ndim not in dims:
        chunk_dim = keep.index(spec.dim % ndim)

    def block_map(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        new_offsets = [0 if d in dims else offsets[d] for d in keep]
        new_sizes = [1 if d in dims else sizes[d] for d in keep]
        if 0 in sizes and new_sizes and 0 not in new_sizes:
            new_sizes[0] = 0  # an empty block stays empty
        return new_offsets, new_sizes

    return relayout(layout, size, chunk_dim, block_map)


def derived_layout(layout: Layout, size: Sequence[int], chunk_dim: int | None,
                   block_map: BlockMap) -> Layout:
    """``view._relayout`` whose empty blocks stay empty when ``block_map`` drops the dim that
    made them empty."""

    def keep_empty(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        new_offsets, new_sizes = block_map(offsets, sizes)
        if 0 in sizes and new_sizes and 0 not in new_sizes:
            new_sizes[0] = 0
        return new_offsets, new_sizes

    return relayout(layout, size, chunk_dim, keep_empty)


def chunk_dim_of(layout: Layout) -> int | None:
    spec = layout.spec
    if isinstance(spec, ChunkShardingSpec):
        return spec.dim % len(layout.size)
    return None
