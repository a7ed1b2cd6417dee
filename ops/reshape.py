"""``x.view(size)`` and ``_unsafe_view``: what ``reshape`` and ``flatten`` of a
ShardedTensor reach (its strides are always contiguous, so a view of it is legal).

Per rank, the view pairs runs of old dims with runs of new dims of equal product (a
group); each block's fate is decided by its layout alone:

* Blocks stay blocks when, in each group, only the outermost real (size > 1) old dim is
  split and every block starts and ends on whole rows of the new group's inner dims:
  ``[B, S/R, H * Dh] -> [B, S/R, H, Dh]``, a column-parallel ``[B, S, (H * Dh)/R] -> [B,
  S, H/R, Dh]`` (blocks on head boundaries) and back. Each block is viewed to its extent
  (a strided block is reshaped: a copy, as dense ``reshape`` does). Collectives: none.
* Blocks cut into pieces (NOTE [views that cut blocks into pieces]): ``[B, H/R, S, Dh] ->
  [B * H, S, Dh]`` makes each rank's block ``B`` blocks of the view, views of it (a rank
  holds several blocks). Collectives: none.
* ``x.view(())`` of a sharded one-element ``x``: a 0-dim block on the rank holding the
  element, none elsewhere. Collectives: none.
* Anything else (a run that is no box of the new dims, more than 4096 pieces): on the
  whole value, one gather and a replicated result that no longer aliases ``x`` (NOTE
  [replicated fallback] in :mod:`dispatch_shard.ops.view`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch

from dispatch_shard.layout import Layout, layout_of
from dispatch_shard.metadata import ShardMetadata
from dispatch_shard.ops._common import replicated_fallback, view_blocks
from dispatch_shard.ops.layouts import relayout, split_dims
from dispatch_shard.registry import _group_free, custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor
from dispatch_shard.specs import ChunkShardingSpec, EnumerableShardingSpec

__all__: list[str] = []

aten = torch.ops.aten


# -- views that keep the blocks -------------------------------------------------------

def _dim_groups(old: Sequence[int], new: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of old dims with runs of new dims of equal product (size-1 dims attach to a
    neighbour); None when the sizes do not match."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old) or j < len(new):
        gi, gj = [], []
        pi = pj = 1
        if i < len(old):
            gi.append(i)
            pi *= old[i]
            i += 1
        if j < len(new):
            gj.append(j)
            pj *= new[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(old):
                gi.append(i)
                pi *= old[i]
                i += 1
            elif pj < pi and j < len(new):
                gj.append(j)
                pj *= new[j]
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


@functools.lru_cache(maxsize=1024)
def _viewed(layout: Layout, size: tuple[int, ...]) -> Layout | None:
    """The layout of ``x.view(size)`` when every block stays a block; else None.

    A view pairs runs of old dims with runs of new dims of equal product (a group).
    Blocks survive when, in each group, only the outermost real (size > 1) old dim
    may be split, and each block's range of the group's flattened index starts and
    ends on a multiple of the product of the new group's inner dims: splitting a
    column-parallel ``[B, S, H * Dh]`` into heads ``[B, S, H, Dh]`` (blocks on head
    boundaries), and merging ``[B, S, H, Dh]`` back.
    """
    groups = _dim_groups(list(layout.size), list(size))
    if groups is None:
        return None
    split = split_dims(layout)
    chunk_dim = None
    spec_dim = layout.spec.dim % len(layout.size) \
        if isinstance(layout.spec, ChunkShardingSpec) else None
    # Per group: (outermost real old dim, its inner product, outermost real new dim, its
    # inner product); None for a group no block splits (the new dims are whole).
    plans: list[tuple[list[int], list[int], tuple[int, int, int, int] | None]] = []
    for old_dims, new_dims in groups:
        real_old = [d for d in old_dims if layout.size[d] != 1]
        real_new = [e for e in new_dims if size[e] != 1]
        cut = [d for d in old_dims if d in split]
        if len(real_old) == 1 and len(real_new) == 1:  # one dim of unchanged size
            plans.append((old_dims, new_dims, (real_old[0], 1, real_new[0], 1)))
            if spec_dim == real_old[0]:
                chunk_dim = real_new[0]
            continue
        if not cut or not real_new:
            plans.append((old_dims, new_dims, None))
            continue
        if cut != real_old[:1]:
            return None  # an inner dim is split: a block is no box of the new dims
        inner_old = math.prod(layout.size[d] for d in real_old[1:])
        inner_new = math.prod(size[e] for e in real_new[1:])
        for shard in layout.shards:
            if 0 in shard.shard_sizes:
                continue
            lo = shard.shard_offsets[real_old[0]] * inner_old
            hi = lo + shard.shard_sizes[real_old[0]] * inner_old
            if lo % inner_new or hi % inner_new:
                return None  # a block ends inside a row of the new inner dims
        plans.append((old_dims, new_dims, (real_old[0], inner_old, real_new[0], inner_new)))
        if spec_dim == real_old[0]:
            chunk_dim = real_new[0]

    def block_map(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        new_offsets, new_sizes = [0] * len(size), list(size)
        for _, _, plan in plans:
            if plan is None:
                continue
            old, inner_old, new, inner_new = plan
            lo = offsets[old] * inner_old
            # (one-to-one: offsets as they are, a chunk's empty blocks' unclamped ones too)
            new_offsets[new] = lo if inner_new == inner_old == 1 else min(lo // inner_new,
                                                                           size[new])
            new_sizes[new] = sizes[old] * inner_old // inner_new
        if 0 in sizes and new_sizes and 0 not in new_sizes:
            new_sizes[0] = 0  # an empty block stays empty
        return new_offsets, new_sizes

    enumerated = relayout(layout, size, None, block_map)
    if chunk_dim is not None and enumerated.is_sharded:
        chunked = relayout(layout, size, chunk_dim, block_map)
        if [(s.shard_offsets, s.shard_sizes, s.placement) for s in chunked.shards] == [
                (s.shard_offsets, s.shard_sizes, s.placement) for s in enumerated.shards]:
            return chunked
    return enumerated


# -- views that cut blocks into pieces ------------------------------------------------

# NOTE [views that cut blocks into pieces]
# A block of ``[B, H, S, Dh]`` holding every batch entry and a range of heads is no
# box of ``[B * H, S, Dh]``: in row-major order it is B separate runs. Torch's
# ``matmul`` of 4-D tensors makes exactly this view (it folds the leading dims into
# one batch dim for ``bmm``). Such a block is cut into pieces, one per run (here
# ``block[b]`` for each b), and each piece is a block of the view: a rank then holds
# several blocks, and the pieces are views of its block (no copy, no collective).
# A run maps onto the new dims as a box when it starts and ends on whole rows of
# the new dims inside one outer index (the same rule in both directions), so
# merging the pieces back (``[B * H, S, S] -> [B, H, S, S]``) keeps them blocks.
_MAX_PIECES = 4096  # beyond this many blocks, gathering is cheaper than bookkeeping


def _runs(offsets: Sequence[int], sizes: Sequence[int], full: Sequence[int]
          ) -> list[tuple[tuple[tuple[int, int], ...], int, int]]:
    """A box (``offsets``, ``sizes`` within dims of extents ``full``) as row-major runs:
    (the run's box relative to the block, as (offset, length) per dim; its flat start;
    its length)."""
    strides = [math.prod(full[d + 1:]) for d in range(len(full))]
    cut = [d for d in range(len(full)) if sizes[d] != full[d]]
    if not cut:
        return [(tuple((0, n) for n in sizes), 0, math.prod(full))]
    m = cut[-1]  # the innermost cut dim: the dims inside it are whole
    runs = []
    outer = [range(sizes[d]) for d in range(m)]
    for index in itertools.product(*outer):
        start = sum((offsets[d] + i) * strides[d] for d, i in enumerate(index))
        start += offsets[m] * strides[m]
        box = tuple((i, 1) for i in index) + tuple((0, sizes[d]) for d in range(m, len(full)))
        runs.append((box, start, sizes[m] * strides[m]))
    return runs


def _run_box(start: int, length: int, full: Sequence[int]
             ) -> tuple[list[int], list[int]] | None:
    """The box of dims of extents ``full`` that the row-major run covers, or None when
    it is no box."""
    strides = [math.prod(full[d + 1:]) for d in range(len(full))]
    real = [d for d in range(len(full)) if full[d] != 1]
    if not real:
        return [0] * len(full), [1] * len(full)
    m = next((d for d in real if strides[d] <= length), real[-1])
    if start % strides[m] or length % strides[m]:
        return None
    first, count = (start // strides[m]) % full[m], length // strides[m]
    if first + count > full[m]:
        return None
    offsets = [(start // strides[d]) % full[d] if d < m else 0 for d in range(len(full))]
    sizes = [1 if d < m else full[d] for d in range(len(full))]
    offsets[m], sizes[m] = first, count
    return offsets, sizes


Piece = tuple[tuple[slice, ...], tuple[int, ...]]


@functools.lru_cache(maxsize=1024)
def _cut_viewed(layout: Layout, size: tuple[int, ...]
                ) -> tuple[Layout, tuple[tuple[Piece, ...], ...]] | None:
    """The layout of ``x.view(size)`` with blocks cut into pieces (NOTE [views that cut
    blocks into pieces]), and per old block its pieces: (the piece's slices of the
    block, the piece's sizes in the view). None when a run is no box of the new dims."""
    groups = _dim_groups(list(layout.size), list(size))
    if groups is None or not layout.is_sharded or not size:
        return None
    blocks: list[ShardMetadata] = []
    pieces: list[tuple[Piece, ...]] = []
    for shard in layout.shards:
        if 0 in shard.shard_sizes:  # an empty block stays one empty block
            empty = [0, *size[1:]]
            blocks.append(ShardMetadata([0] * len(size), empty, shard.placement))
            pieces.append(((tuple(slice(None) for _ in layout.size), tuple(empty)),))
            continue
        # Per group: the block's runs, each with its box in the new dims.
        per_group = []
        for old_dims, new_dims in groups:
            found = []
            for box, start, length in _runs([shard.shard_offsets[d] for d in old_dims],
                                            [shard.shard_sizes[d] for d in old_dims],
                                            [layout.size[d] for d in old_dims]):
                mapped = _run_box(start, length, [size[e] for e in new_dims])
                if mapped is None:
                    return None
                found.append((box, mapped))
            per_group.append(found)
        own: list[Piece] = []
        for combination in itertools.product(*per_group):
            relative = [r for box, _ in combination for r in box]
            offsets = [o for _, (offs, _) in combination for o in offs]
            sizes = [n for _, (_, ns) in combination for n in ns]
            blocks.append(ShardMetadata(offsets, sizes, shard.placement))
            own.append((tuple(slice(o, o + n) for o, n in relative), tuple(sizes)))
        pieces.append(tuple(own))
        if len(blocks) > _MAX_PIECES:
            return None
    new_layout = layout_of(EnumerableShardingSpec(blocks), torch.Size(size),
                           layout.group_ranks)
    return new_layout, tuple(pieces)


def _cut_view(x: ShardedTensor, size: tuple[int, ...]) -> ShardedTensor | None:
    """``x.view(size)`` by NOTE [views that cut blocks into pieces]; None where it does
    not apply."""
    cut = _cut_viewed(x._layout, size)
    if cut is None:
        return None
    layout, pieces = cut
    blocks = [block[box].reshape(sizes)
              for block, i in zip(x._local_tensors, x._layout.local_indices(x._rank),
                                  strict=True)
              for box, sizes in pieces[i]]
    return x._like(blocks, layout)


# -- view, _unsafe_view ---------------------------------------------------------------

def _only_element(x: ShardedTensor) -> ShardedTensor:
    """``x.view(())`` of a sharded one-element ``x``: a 0-dim block on the rank holding the
    element (a 0-dim block cannot be empty: the empty blocks go); no collectives."""
    layout = x._layout
    owner = next(i for i, s in enumerate(layout.shards) if math.prod(s.shard_sizes) == 1)
    new_layout = layout_of(
        EnumerableShardingSpec([ShardMetadata([], [], layout.shards[owner].placement)]),
        torch.Size([]), layout.group_ranks)
    local = layout.local_indices(x._rank)
    blocks = [x._local_tensors[local.index(owner)].reshape(())] if owner in local else []
    return x._like(blocks, new_layout)


def _view(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.view(size)``: each block viewed to its extent when no block is cut, else cut into
    pieces; no collectives (else see NOTE [replicated fallback] in
    :mod:`dispatch_shard.ops.view`)."""
    x, size = args[0], list(args[1])
    if -1 in size:
        known = math.prod(s for s in size if s != -1)
        size[size.index(-1)] = x.numel() // known if known else 0
    if not size and x._layout.is_sharded:
        return _only_element(x)
    layout = _viewed(x._layout, tuple(size))
    if layout is None:
        cut = _cut_view(x, tuple(size))
        if cut is not None:
            return cut
        return replicated_fallback(aten.reshape.default, (x, size), {})
    # NOTE: a ShardedTensor always has contiguous strides, so a view of it is legal
    # even where a block is strided (a transposed block): such a block is
    # reshaped, a copy, as dense reshape would do for a strided tensor.
    return view_blocks(x, layout, lambda t, _, out: t.reshape(out.shard_sizes))


_group_free(_view)  # one operand: NOTE [implementations that find their own group]
for _overload in (aten.view.default, aten._unsafe_view.default):
    custom_sharded_op_impl(_overload, handles_partial=True)(_view)
