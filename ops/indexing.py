"""Indexing along one dim with an index tensor: ``gather``, ``scatter`` (also with
``reduce=``) / ``scatter_add`` / ``scatter_reduce`` (and their in-place forms),
``index_select`` and ``index_add(_)``. (Advanced indexing, ``x[indices]`` and
``index_put``, lives in :mod:`dispatch_shard.ops.advanced_indexing`, which shares the
notes below; ``nll_loss``, which picks one class per sample, lives with the losses.)

Per rank, for ``x`` indexed along ``dim`` by an index tensor (``R`` ranks; "replicated"
includes plain tensors, see NOTE [index operands are replicated values]):

* Along a dim no block splits (``x [M/R, N]`` gathered along dim 1, ``x [M, N/R]``
  indexed along dim 0): block by block, with the index (and ``src``) sliced by the
  block's box along the other dims. The result keeps ``x``'s blocks along the other dims.
  Collectives: none.
* Along a split dim, reading (``gather``, ``index_select``): each rank reads the entries
  its blocks hold and leaves zeros elsewhere -> ``Partial("sum")`` of the result's size.
  Collectives: none (the consumer reduces, or not).
* Along a split dim, writing (``scatter*``, ``index_add``): each block takes the writes
  that land in it (the others go to a scratch slot and are dropped); the result keeps
  ``x``'s layout. Collectives: none.
* Replicated ``x`` with an index / ``src`` sharded along the other dims (the backward of
  the blockwise case: ``new_zeros(x.shape).scatter_add(dim, index, grad)``): block by block
  along the sharded operand's blocks, so the gradient comes out sharded like ``x`` was.
  Collectives: none.
* Anything else: the sharded operands are gathered whole (one all-to-all each) and the
  op runs on the whole value -> replicated (in-place forms write into ``x`` as it is).

Errors are dense's: every op first runs on meta tensors of the global sizes (shape and
dtype errors, the same on every rank), and index values are bounds-checked on the whole
(replicated) index, so a bad index raises on every rank alike. An index that is sharded
(and used block by block) is checked per block and the verdict is exchanged
(:func:`dispatch_shard.collectives.raise_if_any`, one small all-gather) before any rank
moves on.

NOTE [index operands are replicated values]
Index tensors, ``src`` / ``values`` / ``source`` operands, class weights and targets are
usually plain tensors: the same on every rank, so every rank can slice what its blocks
need without communication. A ShardedTensor in those positions is used block by block
when its layout lines up with the result's blocks, and gathered whole otherwise.

NOTE [selections commute with partial reductions]
``gather``, ``index_select`` and ``index`` pick elements. Picking commutes with every
elementwise reduction across ranks (sum, avg, max, min), so a ``Partial`` input with a
replicated index is indexed summand by summand and the result is ``Partial`` with the same
reduce op: no collective.

NOTE [ShardedTensor.gather is the legacy gather]
``x.gather(dst, out)`` on a ShardedTensor is the legacy gather-to-one-rank method (the
public API keeps it), so ``x.gather(dim, index)`` does not reach ``aten.gather``: write
``torch.gather(x, dim, index)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dispatch_shard import collectives
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
    replicated_result,
)
from dispatch_shard.ops.layouts import (
    chunk_dim_of,
    derived_layout,
    sliced_layout,
    split_dims,
)
from dispatch_shard.registry import custom_sharded_op_impl
from dispatch_shard.sharded_tensor import ShardedTensor

__all__ = ["Check", "bounds_check", "into_partial_error"]

aten = torch.ops.aten

Check = Callable[[torch.Tensor], None]


# -- operands ------------------------------------------------------------------------------

def _index_pieces(index: Any, layout: Layout, rank: int, check: Check,
                  anchor: ShardedTensor) -> list[torch.Tensor]:
    """:func:`pieces_of` of an index tensor, bounds-checked alike on every rank: a whole
    index is checked locally (every rank holds the same one); a sharded index is checked
    block by block and the verdict exchanged."""
    if is_block_sharded(index):
        pieces = pieces_of(index, layout, rank)
        error: Exception | None = None
        try:
            for piece in pieces:
                check(piece)
        except (RuntimeError, IndexError) as exc:
            error = exc
        collectives.raise_if_any(error, anchor._process_group)
        return pieces
    whole = dense_value(index)
    check(whole)
    return [whole[layout.shard_box(i)] for i in layout.local_indices(rank)]


# -- layouts ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def _with_dim_length(layout: Layout, dim: int, length: int) -> Layout:
    """``layout`` with ``dim`` (which no block splits) now of ``length``: blocks that span
    ``dim`` span the new length, empty blocks stay empty."""
    size = [length if d == dim else n for d, n in enumerate(layout.size)]
    chunk = chunk_dim_of(layout)

    def block_map(offsets: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
        new_offsets = [0 if d == dim else o for d, o in enumerate(offsets)]
        new_sizes = [(length if n or 0 not in sizes else 0) if d == dim else n
                     for d, n in enumerate(sizes)]
        return new_offsets, new_sizes

    return derived_layout(layout, size, chunk if chunk != dim else None, block_map)


@functools.lru_cache(maxsize=1024)
def _gathered_layout(layout: Layout, dim: int, shape: tuple[int, ...]) -> Layout:
    """The blocks of ``gather(x, dim, index)`` (``index.shape == shape``) for ``x`` laid out
    by ``layout`` with ``dim`` unsplit: the other dims clipped to ``shape``, ``dim`` of
    ``shape[dim]``."""
    for d, n in enumerate(shape):
        if d != dim and n != layout.size[d]:
            layout = sliced_layout(layout, d, 0, n)
    return _with_dim_length(layout, dim, shape[dim])


def _region(box: Box, dim: int, shape: Sequence[int]) -> tuple[Box, Box]:
    """For a block ``box`` of ``x`` and an index of ``shape`` along ``dim``: the part of the
    index (global coordinates) the block serves, and the same part relative to the block.
    Along ``dim`` both are whole."""
    in_index, in_block = [], []
    for d, (span, n) in enumerate(zip(box, shape, strict=True)):
        if d == dim:
            in_index.append(slice(None))
            in_block.append(slice(None))
        else:
            start, stop = min(span.start, n), min(span.stop, n)
            in_index.append(slice(start, stop))
            in_block.append(slice(0, stop - start))
    return tuple(in_index), tuple(in_block)


# -- checks (also for ops/advanced_indexing.py) ------------------------------------------

def bounds_check(size: int, dim: int, *, negative: bool = False,
                 error: type[Exception] = RuntimeError) -> Check:
    """A check that raises dense's "index ... is out of bounds" for values outside
    ``[0, size)`` (``[-size, size)`` with ``negative``)."""

    def check(index: torch.Tensor) -> None:
        if index.numel() == 0:
            return
        low = -size if negative else 0
        bad = (index < low) | (index >= size)
        if bool(bad.any()):
            value = int(index[bad].reshape(-1)[0])
            raise error(f"index {value} is out of bounds for dimension {dim} with size {size}")

    return check


def into_partial_error(func: torch._ops.OpOverload) -> NotImplementedError:
    """The error an in-place write into a ``Partial`` ``x`` raises (its blocks hold
    summands, not the value)."""
    return NotImplementedError(f"{func} into a Partial ShardedTensor not supported for "
                               "ShardedTensor!")


# -- gather --------------------------------------------------------------------------------------

@custom_sharded_op_impl(aten.gather.default, handles_partial=True)
def gather(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``torch.gather(x, dim, index)`` (use ``torch.gather``: ``ShardedTensor.gather`` is the
    legacy gather-to-one-rank).

    * ``x [M/R, N]`` along the unsplit dim 1, ``index [M, k]`` -> ``[M/R, k]`` in ``x``'s
      blocks (other dims clipped to the index); collectives: none.
    * ``x`` split along ``dim``, replicated index -> ``Partial("sum") [*index.shape]``: each
      rank reads what it holds, zeros elsewhere; collectives: none.
    * replicated ``x``, index sharded -> the index's layout; collectives: none.
    * ``Partial`` ``x``, replicated index -> ``Partial`` of the same op (NOTE [selections
      commute with partial reductions]); collectives: none.
    A sharded index not lined up with the result is gathered whole (one all-to-all).
    """
    func = aten.gather.default
    bound = bind_arguments(func, args, kwargs)
    x, index = bound["self"], bound["index"]
    results = meta_results(func, args, kwargs)
    ((size, dtype),) = results
    anchor = first_sharded(args, kwargs)
    if not in_group(anchor):
        return outside_result(anchor, results)
    dim = bound["dim"] % max(x.dim(), 1)
    check = bounds_check(x.shape[dim] if x.dim() else 1, dim)
    rank = anchor._rank
    if 0 in size:
        # An empty index picks nothing (dense allows any dims and integer dtype then).
        return replicated_result(anchor, torch.empty(size, dtype=dtype, device=anchor.device), size,
                           dtype)

    def local(block: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.gather(block, dim, idx)

    if isinstance(x, ShardedTensor) and x._layout.is_partial and not is_block_sharded(index):
        idx = dense_value(index)
        check(idx)
        summand = local(x._local_tensors[0], idx)
        return partial_result(anchor, summand, dtype, x._layout.spec.reduce_op)  # type: ignore[attr-defined]
    if is_block_sharded(x):
        layout = x._layout
        if dim not in split_dims(layout):
            out_layout = _gathered_layout(layout, dim, tuple(size))
            pieces = _index_pieces(index, out_layout, rank, check, anchor)
            blocks = []
            for block, idx, i, j in zip(x._local_tensors, pieces, layout.local_indices(rank),
                                        out_layout.local_indices(rank), strict=True):
                sizes = out_layout.shards[j].shard_sizes
                if 0 in sizes:
                    blocks.append(block.new_empty(sizes))
                else:
                    blocks.append(local(block[_region(layout.shard_box(i), dim, size)[1]], idx))
            return x._like(blocks, out_layout, dtype)
        idx = dense_value(index)
        check(idx)
        summand = torch.zeros(size, dtype=dtype, device=x.device)
        for block, i in zip(x._local_tensors, layout.local_indices(rank), strict=True):
            box = layout.shard_box(i)
            low, high = box[dim].start, box[dim].stop
            in_index, in_block = _region(box, dim, size)
            piece = idx[in_index]
            if piece.numel() == 0 or high == low:
                continue
            hit = (piece >= low) & (piece < high)
            picked = local(block[in_block], (piece - low).clamp_(0, high - low - 1))
            target = summand[in_index]
            target.copy_(torch.where(hit, picked, target))
        return partial_result(anchor, summand, dtype)
    whole_x = dense_value(x)
    if is_block_sharded(index):
        out_layout = index._layout
        pieces = _index_pieces(index, out_layout, rank, check, anchor)
        blocks = [local(whole_x[_region(out_layout.shard_box(j), dim, whole_x.shape)[0]]
                        if whole_x.dim() else whole_x, idx)
                  if idx.numel() else idx.new_empty(idx.shape, dtype=dtype)
                  for idx, j in zip(pieces, out_layout.local_indices(rank), strict=True)]
        return index._like(blocks, out_layout, dtype)
    idx = dense_value(index)
    check(idx)
    return replicated_result(anchor, local(whole_x, idx), size, dtype)


# -- scatter, scatter_add, scatter_reduce --------------------------------------------------------

_SCATTER: dict[torch._ops.OpOverload, tuple[torch._ops.OpOverload, bool]] = {
    aten.scatter.src: (aten.scatter_.src, False),
    aten.scatter_.src: (aten.scatter_.src, True),
    aten.scatter.value: (aten.scatter_.value, False),
    aten.scatter_.value: (aten.scatter_.value, True),
    aten.scatter.reduce: (aten.scatter_.reduce, False),  # reduce="add" / "multiply"
    aten.scatter_.reduce: (aten.scatter_.reduce, True),
    aten.scatter.value_reduce: (aten.scatter_.value_reduce, False),
    aten.scatter_.value_reduce: (aten.scatter_.value_reduce, True),
    aten.scatter_add.default: (aten.scatter_add_.default, False),
    aten.scatter_add_.default: (aten.scatter_add_.default, True),
    aten.scatter_reduce.two: (aten.scatter_reduce_.two, False),
    aten.scatter_reduce_.two: (aten.scatter_reduce_.two, True),
}


def _scatter(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``x.scatter(dim, index, src|value)``, ``scatter_add``, ``scatter_reduce`` and the
    in-place forms; the result has ``x``'s layout.

    * ``x`` sharded, ``dim`` unsplit: each block scatters the index / ``src`` rows of its
      box along the other dims; collectives: none.
    * ``x`` split along ``dim``: each block scatters the entries that land in it (the
      others go to a scratch slot that is dropped); collectives: none.
    * replicated ``x`` (out of place), index or ``src`` sharded along the other dims with
      ``dim`` unsplit (the backward of ``gather``): block by block along that operand's
      blocks -> sharded like it, with ``dim`` of ``x``'s length; collectives: none.
    * otherwise sharded operands are gathered whole (one all-to-all each) -> replicated.
    A ``Partial`` ``x`` is reduced first (out of place) or refused (in place).
    """
    inplace_op, inplace = _SCATTER[func]
    bound = bind_arguments(func, args, kwargs)
    x, index = bound["self"], bound["index"]
    src_name = "src" if "src" in bound else "value"
    src = bound[src_name]
    extra = {k: v for k, v in bound.items() if k not in ("self", "dim", "index", src_name)}
    results = meta_results(func, args, kwargs)
    ((size, dtype),) = results
    anchor = first_sharded(args, kwargs)
    if not in_group(anchor):
        return x if inplace else outside_result(anchor, results)
    dim = bound["dim"] % max(x.dim(), 1)
    check = bounds_check(x.shape[dim] if x.dim() else 1, dim)
    rank = anchor._rank
    tensor_src = isinstance(src, torch.Tensor)
    index_size = tuple(index.shape)

    def apply(target: torch.Tensor, idx: torch.Tensor, piece: Any) -> None:
        inplace_op(target, dim, idx, piece, **extra)

    def src_pieces(layout: Layout) -> list[Any]:
        """``src``'s part for each local block of ``layout`` (a layout of the index's size)."""
        count = len(layout.local_indices(rank))
        if not tensor_src:
            return [src] * count
        if isinstance(src, ShardedTensor) and src.shape == index.shape:
            return pieces_of(src, layout, rank)
        whole = dense_value(src)[tuple(slice(0, n) for n in index_size)]
        return pieces_of(whole, layout, rank)

    if isinstance(x, ShardedTensor) and x._layout.is_partial:
        if inplace:
            raise into_partial_error(func)
        x = x._reduced()
    if is_block_sharded(x):
        layout = x._layout
        targets = x._local_tensors if inplace else [b.clone() for b in x._local_tensors]
        if dim not in split_dims(layout):
            like = _gathered_layout(layout, dim, index_size)
            pieces = _index_pieces(index, like, rank, check, anchor)
            for target, idx, piece, i in zip(targets, pieces, src_pieces(like),
                                             layout.local_indices(rank), strict=True):
                if idx.numel() and target.numel():
                    apply(target[_region(layout.shard_box(i), dim, index_size)[1]], idx, piece)
        else:
            idx = dense_value(index)
            check(idx)
            whole_src = (dense_value(src)[tuple(slice(0, n) for n in index_size)] if tensor_src
                         else src)
            for target, i in zip(targets, layout.local_indices(rank), strict=True):
                box = layout.shard_box(i)
                low, high = box[dim].start, box[dim].stop
                in_index, in_block = _region(box, dim, index_size)
                piece = idx[in_index]
                if piece.numel() == 0 or high == low:
                    continue
                hit = (piece >= low) & (piece < high)
                if not bool(hit.any()):
                    continue
                view = target[in_block]
                scratch = list(view.shape)
                scratch[dim] = 1
                padded = torch.cat([view, view.new_zeros(scratch)], dim)
                apply(padded, torch.where(hit, piece - low, high - low),
                      whole_src[in_index] if tensor_src else whole_src)
                view.copy_(padded.narrow(dim, 0, high - low))
        return x if inplace else x._like(targets, dtype=dtype)
    if not inplace:
        # (An empty index writes nothing: the whole path below serves it.)
        lined_up = [t for t in (index, src) if is_block_sharded(t) and t.shape == index.shape
                    and dim not in split_dims(t._layout) and index.numel()
                    and index.dim() == x.dim()]
        if (lined_up and (not tensor_src or src.shape == index.shape)
                and all(n == x.shape[d] for d, n in enumerate(index_size) if d != dim)):
            layout = lined_up[0]._layout
            out_layout = _with_dim_length(layout, dim, x.shape[dim])
            pieces = _index_pieces(index, layout, rank, check, anchor)
            whole_x = dense_value(x)
            blocks = []
            for idx, piece, j in zip(pieces, src_pieces(layout), out_layout.local_indices(rank),
                                     strict=True):
                block = whole_x[out_layout.shard_box(j)].clone()
                if idx.numel() and block.numel():
                    apply(block, idx, piece)
                blocks.append(block)
            return lined_up[0]._like(blocks, out_layout, dtype)
    idx = dense_value(index)
    check(idx)
    whole_src = dense_value(src)
    if inplace:
        targets = x._local_tensors if isinstance(x, ShardedTensor) else [x]
        for target in targets:
            apply(target, idx, whole_src)
        return x
    result = dense_value(x).clone()
    apply(result, idx, whole_src)
    return replicated_result(anchor, result, size, dtype)


def _register_scatter(func: torch._ops.OpOverload) -> None:
    def impl(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
        return _scatter(func, args, kwargs)

    impl.__name__ = impl.__qualname__ = f"sharded_{func.name().split('::')[1]}"
    impl.__doc__ = _scatter.__doc__
    custom_sharded_op_impl(func, handles_partial=True)(impl)


for _func in _SCATTER:
    _register_scatter(_func)


# -- index_select, index_add -----------------------------------------------------------------------

@custom_sharded_op_impl(aten.index_select.default, handles_partial=True)
def index_select(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    """``x.index_select(dim, index)``, ``index [k]`` (gathered whole when sharded).

    * ``x [M, N/R]`` along the unsplit dim 0 -> ``[k, N/R]`` in ``x``'s blocks; none.
    * ``x`` split along ``dim`` -> ``Partial("sum")``: each rank reads the rows it holds,
      zeros elsewhere; collectives: none.
    * ``Partial`` ``x`` -> ``Partial`` of the same op; replicated ``x`` -> replicated; none.
    """
    func = aten.index_select.default
    bound = bind_arguments(func, args, kwargs)
    x = bound["self"]
    results = meta_results(func, args, kwargs)
    ((size, dtype),) = results
    anchor = first_sharded(args, kwargs)
    if not in_group(anchor):
        return outside_result(anchor, results)
    dim = bound["dim"] % max(x.dim(), 1)
    idx = dense_value(bound["index"])
    bounds_check(x.shape[dim] if x.dim() else 1, dim)(idx)
    if not isinstance(x, ShardedTensor) or x._layout.is_replicate:
        return replicated_result(anchor, dense_value(x).index_select(dim, idx), size, dtype)
    if x._layout.is_partial:
        return partial_result(anchor, x._local_tensors[0].index_select(dim, idx), dtype,
                        x._layout.spec.reduce_op)  # type: ignore[attr-defined]
    layout, rank = x._layout, x._rank
    if dim not in split_dims(layout):
        out_layout = _with_dim_length(layout, dim, size[dim] if size else 1)
        blocks = [block.index_select(dim, idx) if block.numel()
                  else block.new_empty(out_layout.shards[j].shard_sizes)
                  for block, j in zip(x._local_tensors, out_layout.local_indices(rank),
                                      strict=True)]
        return x._like(blocks, out_layout, dtype)
    flat = idx.reshape(-1)
    summand = torch.zeros(size, dtype=dtype, device=x.device)
    for block, i in zip(x._local_tensors, layout.local_indices(rank), strict=True):
        box = layout.shard_box(i)
        low, high = box[dim].start, box[dim].stop
        where = ((flat >= low) & (flat < high)).nonzero().reshape(-1)
        if where.numel() == 0 or block.numel() == 0:
            continue
        region = tuple(slice(None) if d == dim else s for d, s in enumerate(box))
        summand[region].index_copy_(dim, where, block.index_select(dim, flat[where] - low))
    return partial_result(anchor, summand, dtype)


def _index_add(func: torch._ops.OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any],
               inplace: bool) -> Any:
    """``x.index_add(dim, index, source, alpha)`` and ``index_add_``; ``x``'s layout.

    * ``x`` sharded, ``dim`` unsplit: each block adds the ``source`` rows of its box along
      the other dims; collectives: none (a ``source`` sharded like the ``index_select``
      output is used block by block).
    * ``x`` split along ``dim``: each block adds the index entries that land in it; none.
    * replicated ``x`` (out of place), ``source`` sharded with ``dim`` unsplit: block by
      block along ``source``'s blocks; none.
    * otherwise sharded operands are gathered whole -> replicated. (``index_select``'s
      backward is ``new_zeros(x.shape).index_add_(...)``, in place into a replicated
      tensor: a gradient sharded like the output is gathered there, one all-to-all.)
    """
    bound = bind_arguments(func, args, kwargs)
    x, source, alpha = bound["self"], bound["source"], bound["alpha"]
    results = meta_results(func, args, kwargs)
    ((size, dtype),) = results
    anchor = first_sharded(args, kwargs)
    if not in_group(anchor):
        return x if inplace else outside_result(anchor, results)
    dim = bound["dim"] % max(x.dim(), 1)
    idx = dense_value(bound["index"])
    bounds_check(x.shape[dim] if x.dim() else 1, dim)(idx)
    rank = anchor._rank
    if isinstance(x, ShardedTensor) and x._layout.is_partial:
        if inplace:
            raise into_partial_error(func)
        x = x._reduced()
    if is_block_sharded(x):
        layout = x._layout
        targets = x._local_tensors if inplace else [b.clone() for b in x._local_tensors]
        if dim not in split_dims(layout):
            like = _with_dim_length(layout, dim, source.shape[dim] if source.dim() else 1)
            for target, piece in zip(targets, pieces_of(source, like, rank), strict=True):
                if target.numel():
                    target.index_add_(dim, idx, piece, alpha=alpha)
        else:
            whole = dense_value(source)
            flat = idx.reshape(-1)
            for target, i in zip(targets, layout.local_indices(rank), strict=True):
                box = layout.shard_box(i)
                low, high = box[dim].start, box[dim].stop
                where = ((flat >= low) & (flat < high)).nonzero().reshape(-1)
                if where.numel() == 0 or target.numel() == 0:
                    continue
                region = tuple(slice(None) if d == dim else s for d, s in enumerate(box))
                target.index_add_(dim, flat[where] - low,
                                  whole[region].index_select(dim, where), alpha=alpha)
        return x if inplace else x._like(targets, dtype=dtype)
    if not inplace and is_block_sharded(source) and dim not in split_dims(source._layout):
        out_layout = _with_dim_length(source._layout, dim, x.shape[dim])
        whole_x = dense_value(x)
        blocks = []
        for piece, j in zip(source._local_tensors, out_layout.local_indices(rank), strict=True):
            block = whole_x[out_layout.shard_box(j)].clone()
            if block.numel():
                block.index_add_(dim, idx, piece, alpha=alpha)
            blocks.append(block)
        return source._like(blocks, out_layout, dtype)
    whole_source = dense_value(source)
    if inplace:
        for target in (x._local_tensors if isinstance(x, ShardedTensor) else [x]):
            target.index_add_(dim, idx, whole_source, alpha=alpha)
        return x
    result = dense_value(x).index_add(dim, idx, whole_source, alpha=alpha)
    return replicated_result(anchor, result, size, dtype)


@custom_sharded_op_impl(aten.index_add.default, handles_partial=True)
def index_add(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    return _index_add(aten.index_add.default, args, kwargs, inplace=False)


@custom_sharded_op_impl(aten.index_add_.default, handles_partial=True)
def index_add_(types: Any, args: tuple[Any, ...], kwargs: dict[str, Any], pg: Any) -> Any:
    return _index_add(aten.index_add_.default, args, kwargs, inplace=True)


index_add.__doc__ = index_add_.__doc__ = _index_add.__doc__


