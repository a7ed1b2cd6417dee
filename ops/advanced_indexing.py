"""Advanced indexing: ``x[indices]`` (``aten.index``: long indices, boolean masks) and
``x[indices] = values`` (``index_put`` / ``index_put_``). Indexing along one dim with an
index tensor (``gather``, ``scatter``, ``index_select``, ``index_add``) lives in
:mod:`dispatch_shard.ops.indexing`.

Per rank (``R`` ranks). The indices and ``values`` are replicated values (NOTE [index
operands are replicated values] in :mod:`dispatch_shard.ops.indexing`): a sharded one is
gathered whole (one all-to-all). A boolean mask becomes one long index per masked dim, as
dense does.

* Reading, no indexed dim split (``x [M/R, N]`` as ``x[:, idx]``): each block indexed on
  its own -> ``x``'s blocks along the other dims, the index dims whole. Collectives: none.
* Reading, an indexed dim split (``x [M/R, N]`` as ``x[idx]``, ``x[mask]``): each rank
  reads the elements its blocks hold and leaves zeros elsewhere -> ``Partial("sum")`` of
  the result's size. Collectives: none (the consumer reduces, or not).
* Writing into a sharded ``x``: each block writes the indexed elements that fall in it;
  the result keeps ``x``'s layout. A boolean mask of ``x``'s size with a one-element
  value (``x[x > 0] = 0``) is moved to ``x``'s blocks instead (nothing moves when it is
  plain or laid out like ``x``). Collectives: none.
* Writing into a replicated ``x`` (out of place), with ``values`` sharded and the index dims
  whole (the backward of ``x[:, idx]``): block by block along ``values``' blocks, so the
  gradient comes out sharded like ``x`` was. Collectives: none.
* A ``Partial`` ``x`` is read summand by summand (NOTE [selections commute with partial
  reductions] in :mod:`dispatch_shard.ops.indexing`); written, it is reduced first (out of
  place) or refused (in place).
* Anything else: the op runs on the whole operands -> replicated (in place: written into
  ``x`` as it is).

Errors are dense's: every op first runs on meta tensors of the global sizes, and the
indices are bounds-checked whole (the same on every rank), so a bad index raises on every
rank alike.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from dispatch_shard.layout import Box, Layout
from dispatch_shard.ops._common import (
    bind_arguments,
    dense_value,
    first_sharded,
    in_group,
    is_block_sharded,
    meta_results,
    outside_result,
    partial_result,
    pieces_of,
    replicated_fallback,
    replicated_result,
)
from dispatch_shard.ops.indexing import bounds_check, into_partial_error
from dispatch_shard.ops.layouts import chunk_dim_of, derived_layout, split_dims
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor

__all__: list[str] = []

aten = torch.ops.aten


# -- indices ------------------------------------------------------------------------

def _normalized(index: torch.Tensor, size: int) -> torch.Tensor:
    return torch.where(index < 0, index + size, index)


def _long_indices(x: Any, indices: Sequence[Any]) -> list[torch.Tensor | None] | None:
    """The indices as whole long tensors (``None`` kept); a boolean mask becomes one long
    index per masked dim, as dense does. None when a 0-dim mask asks for dense's special
    case (served by the replicated fallback)."""
    result: list[torch.Tensor | None] = []
    for position, index in enumerate(indices):
        if index is None:
            result.append(None)
            continue
        whole = dense_value(index)
        if whole.dtype in (torch.bool, torch.uint8):
            if whole.dim() == 0:
                return None
            start = len(result)
            expected = list(x.shape[start:start + whole.dim()])
            if list(whole.shape) != expected:
                raise IndexError(
                    f"The shape of the mask {list(whole.shape)} at index {position} does not "
                    f"match the shape of the indexed tensor {list(x.shape)} at index {start}")
            result.extend(whole.nonzero().unbind(1))
        else:
            result.append(whole)
    return result


class _Indexing:
    """What advanced indexing with ``indices`` does to ``x``'s dims (dense's rules)."""

    def __init__(self, x: Any, indices: list[torch.Tensor | None]) -> None:
        ndim = x.dim()
        self.indexed = tuple(d for d, i in enumerate(indices) if i is not None)
        self.others = tuple(d for d in range(ndim) if d not in self.indexed)
        tensors = [i for i in indices if i is not None]
        self.broadcast = tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))
        adjacent = self.indexed == tuple(range(self.indexed[0], self.indexed[-1] + 1))
        self.position = sum(1 for d in self.others if d < self.indexed[0]) if adjacent else 0
        for d in self.indexed:
            index = indices[d]
            assert index is not None
            bounds_check(x.shape[d], d, negative=True, error=IndexError)(index)
        # Flat, non-negative coordinates of every indexed element, one tensor per indexed dim.
        self.flat = [_normalized(t, x.shape[d]).expand(self.broadcast).reshape(-1)
                     for t, d in zip(tensors, self.indexed, strict=True)]

    def hits(self, box: Box) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Positions (into the flat indexed elements) that fall in ``box``, and their
        coordinates relative to the block."""
        hit = torch.ones(self.flat[0].shape, dtype=torch.bool, device=self.flat[0].device)
        for coordinate, d in zip(self.flat, self.indexed, strict=True):
            hit &= (coordinate >= box[d].start) & (coordinate < box[d].stop)
        where = hit.nonzero().reshape(-1)
        return where, tuple(c[where] - box[d].start
                            for c, d in zip(self.flat, self.indexed, strict=True))

    def flat_first(self, value: torch.Tensor) -> torch.Tensor:
        """A value of the indexing result's shape as ``[n_indexed, *other dims]``."""
        count = len(self.broadcast)
        moved = value.movedim(tuple(range(self.position, self.position + count)),
                              tuple(range(count)))
        return moved.reshape(-1, *moved.shape[count:])

    def unflatten(self, value: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`flat_first`."""
        count = len(self.broadcast)
        shaped = value.reshape(*self.broadcast, *value.shape[1:])
        return shaped.movedim(tuple(range(count)),
                              tuple(range(self.position, self.position + count))).contiguous()


# -- layouts ------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def _indexed_layout(layout: Layout, indexed: tuple[int, ...], broadcast: tuple[int, ...],
                    position: int, size: tuple[int, ...]) -> Layout:
    """The blocks of ``x[indices]`` for ``x`` laid out by ``layout`` whose ``indexed`` dims
    no block splits: the other dims keep their blocks, the ``broadcast`` dims of the index
    (at ``position`` of the result) are whole."""
    ndim = len(layout.size)
    others = [d for d in range(ndim) if d not in indexed]
    chunk = chunk_dim_of(layout)
    chunk_dim = None
    if chunk is not None and chunk not in indexed:
        at = others.index(chunk)
        chunk_dim = at + len(broadcast) if at >= position else at

    def block_map(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        new_offsets = [offsets[d] for d in others]
        new_sizes = [sizes[d] for d in others]
        new_offsets[position:position] = [0] * len(broadcast)
        new_sizes[position:position] = list(broadcast)
        return new_offsets, new_sizes

    return derived_layout(layout, size, chunk_dim, block_map)


@functools.lru_cache(maxsize=1024)
def _unindexed_layout(layout: Layout, indexed: tuple[int, ...], broadcast: int, position: int,
                      size: tuple[int, ...]) -> Layout:
    """The inverse of :func:`_indexed_layout`: blocks of ``x`` (of ``size``) from the blocks
    of ``x[indices]`` whose ``broadcast`` index dims (at ``position``) no block splits."""
    ndim = len(size)
    others = [d for d in range(ndim) if d not in indexed]
    chunk = chunk_dim_of(layout)
    chunk_dim = None
    if chunk is not None and not position <= chunk < position + broadcast:
        at = chunk - broadcast if chunk >= position + broadcast else chunk
        chunk_dim = others[at]

    def block_map(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        kept_offsets = offsets[:position] + offsets[position + broadcast:]
        kept_sizes = sizes[:position] + sizes[position + broadcast:]
        new_offsets, new_sizes = [0] * ndim, list(size)
        for at, d in enumerate(others):
            new_offsets[d], new_sizes[d] = kept_offsets[at], kept_sizes[at]
        return new_offsets, new_sizes

    return derived_layout(layout, size, chunk_dim, block_map)


# -- x[indices] ----------------------------------------------------------------------

@custom_sharded_op_impl(aten.index.Tensor, handles_partial=True)
def index(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x[indices]``: advanced indexing; boolean masks become long indices (a sharded mask
    or index is gathered whole: one all-to-all).

    * no indexed dim split (``x [M/R, N]`` as ``x[:, idx]``) -> ``x``'s blocks along the
      other dims, the index dims whole; collectives: none.
    * an indexed dim split (``x [M/R, N]`` as ``x[idx]``, ``x[mask]``) -> ``Partial("sum")``:
      each rank reads the elements it holds, zeros elsewhere; collectives: none.
    * ``Partial`` ``x`` -> ``Partial`` of the same op; replicated ``x`` -> replicated; none.
    """
    func = aten.index.Tensor
    bound = bind_arguments(func, args, kwargs)
    x = bound["self"]
    anchor = first_sharded(args, kwargs)
    indices = _long_indices(x, bound["indices"])
    if indices is None or not any(i is not None for i in indices):
        return replicated_fallback(func, args, kwargs)
    results = meta_results(func, (x, indices), {})
    ((size, dtype),) = results
    if not in_group(anchor):
        return outside_result(anchor, results)
    plan = _Indexing(x, indices)
    if not isinstance(x, ShardedTensor) or x._layout.is_replicate:
        return replicated_result(anchor, aten.index.Tensor(dense_value(x), indices), size, dtype)
    if x._layout.is_partial:
        return partial_result(anchor, aten.index.Tensor(x._local_tensors[0], indices), dtype,
                        x._layout.spec.reduce_op)  # type: ignore[attr-defined]
    layout, rank = x._layout, x._rank
    if size and not set(plan.indexed) & split_dims(layout):
        out_layout = _indexed_layout(layout, plan.indexed, plan.broadcast, plan.position,
                                     tuple(size))
        blocks = [aten.index.Tensor(block, indices) if block.numel()
                  else block.new_empty(out_layout.shards[j].shard_sizes)
                  for block, j in zip(x._local_tensors, out_layout.local_indices(rank),
                                      strict=True)]
        return x._like(blocks, out_layout, dtype)
    order = plan.indexed + plan.others
    summand = torch.zeros(plan.flat[0].numel(), *(x.shape[d] for d in plan.others),
                          dtype=dtype, device=x.device)
    for block, i in zip(x._local_tensors, layout.local_indices(rank), strict=True):
        if block.numel() == 0:
            continue
        box = layout.shard_box(i)
        where, coordinates = plan.hits(box)
        if where.numel() == 0:
            continue
        region = (slice(None), *(box[d] for d in plan.others))
        summand[region][where] = block.permute(order)[coordinates]
    return partial_result(anchor, plan.unflatten(summand), dtype)


# -- x[indices] = values -------------------------------------------------------------

def _index_put(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
               inplace: bool) -> Any:
    """``x[indices] = values`` (``index_put_``) and ``index_put``; ``x``'s layout.

    * a boolean mask of ``x``'s size and a one-element value (``x[x > 0] = 0``): the mask is
      moved to ``x``'s blocks (nothing to move when it is laid out like ``x`` or plain) and
      each block writes its part; collectives: none.
    * ``x`` sharded: each block writes the indexed elements that fall in it (indices and
      values whole: gathered when sharded); collectives: none.
    * replicated ``x`` (out of place), ``values`` sharded with the index dims whole (the
      backward of ``x[:, idx]``): block by block along ``values``' blocks -> sharded like
      ``x`` was; collectives: none.
    * otherwise: whole operands -> replicated (in place: written into ``x`` as it is).
    """
    bound = bind_arguments(func, args, kwargs)
    x, values, accumulate = bound["self"], bound["values"], bound["accumulate"]
    anchor = first_sharded(args, kwargs)
    raw = list(bound["indices"])
    if isinstance(x, ShardedTensor) and x._layout.is_partial:
        if inplace:
            raise into_partial_error(func)
        x = x._reduced()
    if is_block_sharded(x) and _is_full_mask(x, raw) and values.numel() == 1:
        if values.dtype != x.dtype:
            raise RuntimeError("Index put requires the source and destination dtypes match, got "
                               f"{x.dtype} for the destination and {values.dtype} for the source.")
        if not in_group(anchor):
            return x
        rank = x._rank
        value = dense_value(values)
        targets = x._local_tensors if inplace else [b.clone() for b in x._local_tensors]
        for target, mask in zip(targets, pieces_of(raw[0], x._layout, rank), strict=True):
            aten.index_put_.default(target, [mask], value, accumulate)
        return x if inplace else x._like(targets)
    indices = _long_indices(x, raw)
    if indices is None or not any(i is not None for i in indices):
        if inplace:
            raise NotImplementedError(f"{func} with a 0-dim boolean index not supported for "
                                      "ShardedTensor!")
        return replicated_fallback(func, (x, raw, values, accumulate), {})
    results = meta_results(aten.index_put.default, (x, indices, values, accumulate), {})
    ((size, dtype),) = results
    if not in_group(anchor):
        return x if inplace else outside_result(anchor, results)
    plan = _Indexing(x, indices)
    rank = anchor._rank
    if is_block_sharded(x):
        layout = x._layout
        (indexed_size, _), = meta_results(aten.index.Tensor, (x, indices), {})
        flat = plan.flat_first(dense_value(values).expand(indexed_size))
        order = plan.indexed + plan.others
        targets = x._local_tensors if inplace else [b.clone() for b in x._local_tensors]
        for target, i in zip(targets, layout.local_indices(rank), strict=True):
            if target.numel() == 0:
                continue
            box = layout.shard_box(i)
            where, coordinates = plan.hits(box)
            if where.numel() == 0:
                continue
            piece = flat[where][(slice(None), *(box[d] for d in plan.others))]
            target.permute(order).index_put_(coordinates, piece, accumulate)
        return x if inplace else x._like(targets, dtype=dtype)
    count = len(plan.broadcast)
    if not inplace and is_block_sharded(values) and count:
        (indexed_size, _), = meta_results(aten.index.Tensor, (x, indices), {})
        index_dims = set(range(plan.position, plan.position + count))
        if values.shape == indexed_size and not index_dims & split_dims(values._layout):
            out_layout = _unindexed_layout(values._layout, plan.indexed, count, plan.position,
                                           tuple(x.shape))
            whole_x = dense_value(x)
            blocks = []
            for piece, j in zip(values._local_tensors, out_layout.local_indices(rank),
                                strict=True):
                block = whole_x[out_layout.shard_box(j)].clone()
                if block.numel() and piece.numel():
                    aten.index_put_.default(block, indices, piece, accumulate)
                blocks.append(block)
            return values._like(blocks, out_layout, dtype)
    whole_values = dense_value(values)
    if inplace:
        for target in (x._local_tensors if isinstance(x, ShardedTensor) else [x]):
            aten.index_put_.default(target, indices, whole_values, accumulate)
        return x
    result = aten.index_put.default(dense_value(x), indices, whole_values, accumulate)
    return replicated_result(anchor, result, size, dtype)


def _is_full_mask(x: ShardedTensor, indices: Sequence[Any]) -> bool:
    return (len(indices) == 1 and isinstance(indices[0], torch.Tensor)
            and indices[0].dtype == torch.bool and indices[0].shape == x.shape)


@custom_sharded_op_impl(aten.index_put_.default, handles_partial=True)
def index_put_(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    return _index_put(aten.index_put_.default, args, kwargs, inplace=True)


@custom_sharded_op_impl(aten.index_put.default, handles_partial=True)
def index_put(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    return _index_put(aten.index_put.default, args, kwargs, inplace=False)


index_put.__doc__ = index_put_.__doc__ = _index_put.__doc__
